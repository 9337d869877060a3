#!/usr/bin/env python3
"""Splits a folded perf profile (inferno-collapse-perf output) of superdisk into where the time goes.

Each stack is classified by the system call it is in (the frame after do_syscall_64), then by what
the kernel is doing inside it (sleeping, loopback delivery, copying, page-cache lookup); stacks
outside a system call by the user-space area of their leaf frame. Prints shares of all samples.

    python3 breakdown.py folded.txt
"""

import collections
import sys

SYSCALLS = {
    "do_writev": "writev (send replies)",
    "__x64_sys_writev": "writev (send replies)",
    "__x64_sys_epoll_wait": "epoll_wait",
    "do_preadv": "preadv2 (page-cache read)",
    "__x64_sys_preadv2": "preadv2 (page-cache read)",
    "__x64_sys_recvfrom": "recvfrom (read requests)",
    "exit_to_user_mode_loop": "preempted on syscall exit",
    "__x64_sys_futex": "futex",
    "__x64_sys_write": "write (eventfd/log)",
}
NET_RX = {"__netif_receive_skb", "__netif_receive_skb_core", "tcp_v4_rcv", "net_rx_action", "process_backlog", "ip_rcv"}
WAKE = {"try_to_wake_up", "__wake_up_sync_key", "sock_def_readable", "ep_poll_callback"}
COPY = {"_copy_from_iter", "_copy_to_iter", "copy_page_to_iter", "skb_copy_datagram_iter", "__skb_datagram_iter"}
PAGE_CACHE = {"filemap_read", "filemap_get_pages", "filemap_get_read_batch"}


def inside(frames):
    s = set(frames)
    if "schedule" in s or "__schedule" in s:
        return "sleep/switch (schedule)"
    if s & NET_RX:
        return "loopback delivery to the peer"
    if s & WAKE:
        return "waking the peer"
    if s & COPY:
        return "copy"
    if s & PAGE_CACHE:
        return "page-cache lookup"
    return "other"


def classify(frames):
    if "do_syscall_64" in frames:
        i = frames.index("do_syscall_64")
        nxt = frames[i + 1] if i + 1 < len(frames) else ""
        return SYSCALLS.get(nxt, f"syscall other ({nxt})"), inside(frames[i + 1 :])
    if any(f.startswith(("asm_sysvec", "asm_common_interrupt")) for f in frames):
        return "interrupts (timer, IPI) in user space", ""
    leaf = frames[-1]
    if any(k in leaf for k in ("malloc", "free", "realloc", "unlink_chunk", "_int_")):
        return "user: malloc/free", ""
    if "clock_gettime" in leaf or "read_tsc" in leaf or "vdso" in leaf:
        return "user: clock_gettime (Instant::now)", ""
    if any("tokio::runtime" in f for f in frames[-4:]) or "tokio::" in leaf:
        return "user: tokio runtime", ""
    if "tracing" in leaf:
        return "user: tracing", ""
    return "user: superdisk + std (rest)", ""


def main():
    total = 0
    top = collections.Counter()
    detail = collections.Counter()
    with open(sys.argv[1]) as f:
        for line in f:
            stack, n = line.rstrip().rsplit(" ", 1)
            n = int(n)
            total += n
            area, what = classify(stack.split(";"))
            top[area] += n
            if what:
                detail[(area, what)] += n
    for area, v in top.most_common():
        print(f"{100 * v / total:5.1f}%  {area}")
        for (a, what), w in detail.most_common():
            if a == area and 100 * w / total >= 0.5:
                print(f"         {100 * w / total:5.1f}%  {what}")


if __name__ == "__main__":
    main()
