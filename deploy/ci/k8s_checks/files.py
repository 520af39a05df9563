"""Checks of files outside the render: the seccomp profile and the Dockerfile."""

from __future__ import annotations

import json
import re

from k8s_checks.common import IMAGE_TOOLS, ROOT, SECCOMP_FILE, Problems


def check_seccomp_file(pr: Problems) -> None:
    try:
        p = json.loads(SECCOMP_FILE.read_text())
    except (OSError, json.JSONDecodeError) as e:
        pr.err(f"{SECCOMP_FILE.relative_to(ROOT)}: {e}")
        return
    pr.check(p.get("defaultAction") in ("SCMP_ACT_ERRNO", "SCMP_ACT_KILL", "SCMP_ACT_KILL_PROCESS", "SCMP_ACT_TRAP"),
             f"seccomp profile: defaultAction {p.get('defaultAction')} (want deny by default)")
    allowed = set()
    for s in p.get("syscalls", []):
        if s.get("action") == "SCMP_ACT_ALLOW":
            allowed.update(s.get("names", []))
        pr.check(set(s) <= {"names", "action", "args", "errnoRet", "comment"}, f"seccomp profile: unexpected keys {set(s)}")
    need = {"io_uring_setup", "io_uring_enter", "io_uring_register",  # the point of the profile
            "read", "write", "openat", "close", "mmap", "munmap", "mprotect", "brk", "futex", "clone", "execve",
            "exit_group", "rt_sigaction", "rt_sigprocmask", "epoll_wait", "epoll_pwait", "epoll_ctl", "eventfd2",
            "socket", "bind", "setsockopt", "getsockopt", "sendmmsg", "recvmmsg", "sendmsg", "recvmsg", "sendto",
            "recvfrom", "getrandom", "sched_getaffinity", "prctl", "sigaltstack", "set_robust_list", "rseq",
            "clock_gettime", "accept4", "listen", "fcntl", "ioctl", "newfstatat", "statx", "madvise", "gettid"}
    missing = sorted(need - allowed)
    pr.check(not missing, f"seccomp profile: does not allow {missing}")
    arches = set(p.get("architectures") or [])
    pr.check({"SCMP_ARCH_X86_64", "SCMP_ARCH_AARCH64"} <= arches, f"seccomp profile: architectures {sorted(arches)}")


def check_dockerfile(commands: set, pr: Problems) -> None:
    df = ROOT / "deploy" / "docker" / "Dockerfile"
    if not pr.check(df.exists(), "deploy/docker/Dockerfile missing"):
        return
    text = df.read_text()
    pr.check("--platform=$BUILDPLATFORM" in text, "Dockerfile: the builder must run on $BUILDPLATFORM (cross-compile)")
    pr.check(re.search(r"^USER 65532", text, re.M) is not None, "Dockerfile: runtime USER 65532 missing")
    for c in commands:
        if c in IMAGE_TOOLS:
            continue
        pr.check(re.search(r"\b" + re.escape(c) + r"\b", text) is not None,
                 f"Dockerfile: manifests run {c!r}, which the image does not install")
