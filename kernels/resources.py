"""What a compiled kernel variant costs on its GPU, read from what Triton built for it: no GPU needed.

For a `CompiledKernel` that Triton built for a CUDA target (under `compile_only`, or on a GPU):

- registers per thread and stack frame per thread: from the cubin (`cuobjdump -res-usage`);
- spill stores and loads (bytes per thread): `ptxas -v` on the kernel's PTX, for the same target;
- shared memory per program: Triton's allocation (`metadata.shared`, bytes);
- local memory: whether the PTX declares or touches any (`.local`), e.g. libdevice's sin/cos slow path;
- the width of every global load and store that a `tl.load` / `tl.store` became, attributed to the
  pointer argument in the kernel's source (the LLVM IR's debug location of the access, looked up in the
  source file's syntax tree): 128 bits is 4 fp32 or 8 bf16/fp16 values per instruction;
- programs resident per SM at the variant's num_warps (registers, threads, shared memory; A100/H100).

`violations(resources, budget, vector_pointers)` lists what breaks the budget.
The bundled tools come from Triton's own `knobs.nvidia` (the same binaries Triton compiles with).
"""

from __future__ import annotations

import ast
import functools
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from triton import knobs
from triton.runtime.jit import JITFunction

# Per SM, on both A100 (sm_80) and H100 (sm_90): 64K 32-bit registers, 2048 threads, 32 programs;
# shared memory per SM (bytes), of which the driver reserves 1 KiB per program.
REGISTERS_PER_SM = 65536
THREADS_PER_SM = 2048
PROGRAMS_PER_SM = 32
SHARED_PER_SM = {80: 167936, 90: 233472}
SHARED_RESERVED_PER_PROGRAM = 1024


@dataclass(frozen=True)
class Budget:
    """Limits every variant must meet (per thread unless said otherwise)."""

    max_registers: int = 128
    min_programs_per_sm: int = 2
    vector_bits: int = 128  # global accesses through the pointers a case names as vectorisable


@dataclass(frozen=True)
class Access:
    """Global memory instructions of one width that `tl.load`s or `tl.store`s through `pointer` became."""

    pointer: str  # the pointer argument in the source (e.g. "mu_ptr"), or "file:line" where none is found
    kind: str  # "load" or "store"
    bits: int  # bits moved by one instruction (vector lanes x lane width)
    count: int  # instructions of this width in the kernel


@dataclass
class Resources:
    """One compiled variant on one target."""

    kernel: str
    target: str  # "sm_80", "sm_90a"
    num_warps: int
    registers: int
    spill_stores: int  # bytes per thread
    spill_loads: int
    stack: int  # bytes of stack frame per thread
    shared: int  # bytes per program
    local_memory: bool
    programs_per_sm: int
    accesses: list[Access] = field(default_factory=list)

    def widths(self, pointer: str) -> set[int]:
        """Bit widths of the global accesses through `pointer` (empty if the kernel has none)."""
        return {a.bits for a in self.accesses if a.pointer == pointer}

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Resources:
        return cls(**{**data, "accesses": [Access(**a) for a in data["accesses"]]})


def violations(res: Resources, budget: Budget, vector_pointers: Iterable[str] = ()) -> list[str]:
    """What `res` breaks in `budget`, one sentence each; `vector_pointers` must move `budget.vector_bits`."""
    where = f"{res.kernel} on {res.target}"
    found = []
    if res.spill_stores or res.spill_loads:
        found.append(f"{where}: spills {res.spill_stores} B stored, {res.spill_loads} B loaded per thread")
    if res.local_memory or res.stack:
        found.append(f"{where}: uses local memory ({res.stack} B stack frame per thread)")
    if res.registers > budget.max_registers:
        found.append(f"{where}: {res.registers} registers per thread > {budget.max_registers}")
    if res.programs_per_sm < budget.min_programs_per_sm:
        found.append(f"{where}: {res.programs_per_sm} programs per SM at {res.num_warps} warps "
                     f"< {budget.min_programs_per_sm}")  # fmt: skip
    for pointer in vector_pointers:
        narrow = sorted(w for w in res.widths(pointer) if w != budget.vector_bits)
        if narrow:
            found.append(f"{where}: {pointer} accessed {narrow}-bit wide, not {budget.vector_bits}-bit")
    return found


def target_name(arch: int) -> str:
    """Triton compiles compute capability 9.0 for sm_90a (wgmma, TMA) and the others as sm_<arch>."""
    return "sm_90a" if arch == 90 else f"sm_{arch}"


class UnsupportedTriton(RuntimeError):
    """This Triton lacks an internal this module reads (the bundled tools, or JITFunction.device_caches)."""


def compiled_kernels(device: int) -> dict[str, Any]:
    """Every variant that the `@triton.jit` functions of the loaded modules compiled for Triton's `device`,
    by hash (`CompiledKernel.hash`, also the launch metadata's `hash`)."""
    found = {}
    for module in list(sys.modules.values()):
        for value in list(getattr(module, "__dict__", {}).values()):
            if type(value) is not JITFunction:
                continue
            caches = getattr(value, "device_caches", None)
            if caches is None:
                raise UnsupportedTriton("JITFunction.device_caches (the compiled variants per device) is missing")
            if device in caches:
                for kernel in caches[device][0].values():  # (kernel cache, key cache, target, backend, binder)
                    found[kernel.hash] = kernel
    return found


def measure(kernel: Any) -> Resources:
    """The resources of `kernel`, a `CompiledKernel` for an NVIDIA target (`asm` holds llir, ptx, cubin)."""
    meta = kernel.metadata
    arch = meta.target.arch
    ptx, cubin = kernel.asm["ptx"], kernel.asm["cubin"]
    usage = _cubin_usage(cubin, meta.name)
    spill_stores, spill_loads = _ptxas_spills(ptx, target_name(arch))
    return Resources(
        kernel=meta.name,
        target=target_name(arch),
        num_warps=meta.num_warps,
        registers=usage["REG"],
        spill_stores=spill_stores,
        spill_loads=spill_loads,
        stack=usage["STACK"],
        shared=meta.shared,
        local_memory=bool(re.search(r"\.local\b", ptx)) or usage["LOCAL"] > 0,
        programs_per_sm=programs_per_sm(usage["REG"], meta.num_warps, meta.shared, arch, meta.target.warp_size),
        accesses=global_accesses(kernel.asm["llir"]),
    )


def programs_per_sm(registers: int, num_warps: int, shared: int, arch: int, warp_size: int = 32) -> int:
    """Programs (CTAs) of a kernel resident at once on one SM: registers are allocated per warp in units
    of 256 (per thread rounded up to a multiple of 8)."""
    threads = num_warps * warp_size
    by_registers = REGISTERS_PER_SM // (-(-registers // 8) * 8 * threads)
    by_shared = SHARED_PER_SM[arch] // (shared + SHARED_RESERVED_PER_PROGRAM)
    return min(by_registers, THREADS_PER_SM // threads, by_shared, PROGRAMS_PER_SM)


def _cubin_usage(cubin: bytes, name: str) -> dict[str, int]:
    """REG, STACK, SHARED, LOCAL of function `name` in `cubin`, from `cuobjdump -res-usage`."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = _run([_tool("cuobjdump"), "-res-usage", f.name])
    section = out.split(f"Function {name}:", 1)[1]
    return {key: int(re.search(rf"\b{key}:(\d+)", section).group(1)) for key in ("REG", "STACK", "SHARED", "LOCAL")}


def _ptxas_spills(ptx: str, arch: str) -> tuple[int, int]:
    """Spill stores and loads (bytes per thread) that `ptxas -v` reports for `ptx` on `arch`."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        log = _run([_tool("ptxas"), "-v", f"--gpu-name={arch}", str(src), "-o", str(Path(tmp) / "k.o")])
    found = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return int(found.group(1)), int(found.group(2))


def _tool(name: str) -> str:
    """The path of Triton's bundled NVIDIA tool `name` ("ptxas", "cuobjdump")."""
    try:
        return getattr(knobs.nvidia, name).path
    except (AttributeError, RuntimeError) as e:
        raise UnsupportedTriton(f"no bundled {name} ({e})") from e


def _run(cmd: list[str]) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return done.stdout + done.stderr


# One `tl.load` / `tl.store` in the LLVM IR: Triton's inline PTX, e.g. "ld.global.v4.b32", with its !dbg.
_ACCESS = re.compile(r'asm sideeffect "[^"]*?(ld|st)\.global[\w.:]*?\.(?:v(\d+)\.)?[bfsu](\d+)\b.*!dbg !(\d+)')
_METADATA = re.compile(r"^!(\d+) = (?:distinct )?!(\w+)\((.*)\)$", re.M)


def global_accesses(llir: str) -> list[Access]:
    """Global loads and stores of `llir` (Triton's LLVM IR of a kernel), counted by pointer, kind and width."""
    nodes = {int(n): (kind, body) for n, kind, body in _METADATA.findall(llir)}
    counts: dict[tuple[str, str, int], int] = {}
    for op, lanes, lane_bits, dbg in _ACCESS.findall(llir):
        key = (_pointer_at(nodes, int(dbg)), "load" if op == "ld" else "store", int(lanes or 1) * int(lane_bits))
        counts[key] = counts.get(key, 0) + 1
    return [Access(p, k, b, n) for (p, k, b), n in sorted(counts.items())]


def _pointer_at(nodes: dict[int, tuple[str, str]], location: int) -> str:
    """The pointer argument of the `tl.load` / `tl.store` at debug location `location` (a DILocation)."""
    fields = _fields(nodes[location][1])
    line, column = int(fields["line"]), int(fields["column"])
    scope = int(fields["scope"][1:])
    while "file" not in _fields(nodes[scope][1]):  # a scope without a file: look in its parent
        scope = int(_fields(nodes[scope][1])["scope"][1:])
    file = _fields(nodes[int(_fields(nodes[scope][1])["file"][1:])][1])
    path = str(Path(file["directory"].strip('"')) / file["filename"].strip('"'))
    return _pointer_in_source(path, line, column)


def _fields(body: str) -> dict[str, str]:
    return dict(re.findall(r'(\w+): ("[^"]*"|[^,]+)', body))


@functools.cache
def _pointers_in_source(path: str) -> dict[int, list[tuple[int, str]]]:
    """Line -> (column offset, pointer) of every `<module>.load(...)` / `.store(...)` call in the file at `path`:
    the first name ending in "_ptr" (else the first name) in its pointer argument."""
    try:
        tree = ast.parse(Path(path).read_text())
    except OSError:
        return {}
    found: dict[int, list[tuple[int, str]]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args:
            if node.func.attr in ("load", "store"):
                names = [n.id for n in ast.walk(node.args[0]) if isinstance(n, ast.Name)]
                pointers = [n for n in names if n.endswith("_ptr")] or names or ["?"]
                found.setdefault(node.lineno, []).append((node.col_offset, pointers[0]))
    return found


def _pointer_in_source(path: str, line: int, column: int) -> str:
    """The pointer of the load/store call at `line`, `column` of `path`: Triton 3.8 numbers columns from 1,
    3.6 from 0; a call alone on its line is taken whatever the column."""
    calls = _pointers_in_source(path).get(line, [])
    matches = [p for offset, p in calls if column in (offset, offset + 1)]
    if len(matches) == 1 or len(calls) == 1:
        return (matches or [calls[0][1]])[0]
    return f"{Path(path).name}:{line}"
