"""Runs a command as on a CPU whose AMX tiles the kernel does not grant (a VM that does not expose
them, issue 15's Intel Xeon): Linux hands a process the tiles' state only when it asks for it with
arch_prctl(ARCH_REQ_XCOMP_PERM); a seccomp filter answers that request EPERM, for the command and
every process it starts. flux1's kernels, MKL, oneDNN and torch's oneDNN then all run without AMX
(AVX-512 and AVX512-BF16 where the CPU has them), so the paths of such a CPU can be measured on one
with AMX. Linux on x86-64 only.

    python benchmarks/without_amx.py python benchmarks/compare.py ...
"""

import ctypes
import os
import platform
import struct
import sys

ARCH_REQ_XCOMP_PERM = 0x1023
SYSCALL_ARCH_PRCTL = 158  # x86-64
AUDIT_ARCH_X86_64 = 0xC000003E
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
RETURN_ALLOW, RETURN_EPERM = 0x7FFF0000, 0x00050000 | 1
LOAD, JUMP_IF_EQUAL, RETURN = 0x20, 0x15, 0x06  # BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K, BPF_RET|BPF_K
ARCH, NUMBER, FIRST_ARGUMENT = 4, 0, 16  # offsets in struct seccomp_data


class Program(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def instruction(code: int, value: int, if_true: int = 0, if_false: int = 0) -> bytes:
    return struct.pack("HBBI", code, if_true, if_false, value)


FILTER = b"".join(
    [
        instruction(LOAD, ARCH),
        instruction(JUMP_IF_EQUAL, AUDIT_ARCH_X86_64, 1, 0),
        instruction(RETURN, RETURN_ALLOW),
        instruction(LOAD, NUMBER),
        instruction(JUMP_IF_EQUAL, SYSCALL_ARCH_PRCTL, 0, 3),
        instruction(LOAD, FIRST_ARGUMENT),
        instruction(JUMP_IF_EQUAL, ARCH_REQ_XCOMP_PERM, 0, 1),
        instruction(RETURN, RETURN_EPERM),
        instruction(RETURN, RETURN_ALLOW),
    ]
)


def refuse_amx() -> None:
    """From now on this process and its children are refused the tiles."""
    libc = ctypes.CDLL(None, use_errno=True)
    code = ctypes.create_string_buffer(FILTER, len(FILTER))
    program = Program(len(FILTER) // 8, ctypes.addressof(code))
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) or libc.prctl(
        PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(program), 0, 0
    ):
        sys.exit(f"without_amx.py: installing the seccomp filter failed: {os.strerror(ctypes.get_errno())}")


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        sys.exit(
            f"without_amx.py: Linux on x86-64 only (this is {platform.system()} on {platform.machine()})"
        )
    refuse_amx()
    os.execvp(sys.argv[1], sys.argv[1:])


if __name__ == "__main__":
    main()
