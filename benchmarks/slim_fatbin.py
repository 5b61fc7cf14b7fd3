"""Keep one GPU architecture's machine code in a CUDA library, so it travels to a lent GPU machine in fewer parts.

    python benchmarks/slim_fatbin.py LIB.so 90      # zero every cubin in .nv_fatbin not built for sm_90, in place

onnxruntime-gpu's CUDA provider carries SASS for sm_75, 80, 86, 89, 90 and 120 (no PTX): 219 MB of its 284. The
driver picks the cubin whose architecture matches the GPU, so on a Hopper machine only the sm_90 entries are read;
zeroing the payloads of the others (headers and sizes untouched, so every offset stays valid) lets xz shrink them to
nothing. It refuses a library with no cubin for the architecture kept: that one would not run at all.
"""

import struct
import sys

FATBIN_MAGIC = 0xBA55ED50
ELF_KIND = 2


def sections(data: bytes) -> dict[str, tuple[int, int]]:
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    heads = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names = heads[shstrndx][4]
    out = {}
    for h in heads:
        start = names + h[0]
        out[data[start:data.index(b"\0", start)].decode()] = (h[4], h[4] + h[5])
    return out


def slim(path: str, keep_arch: int) -> tuple[int, int]:
    data = bytearray(open(path, "rb").read())
    if data[:4] != b"\x7fELF":
        sys.exit(f"slim_fatbin: {path} is not an ELF library")
    if ".nv_fatbin" not in (secs := sections(data)):
        sys.exit(f"slim_fatbin: {path} has no .nv_fatbin section")
    off, end = secs[".nv_fatbin"]
    kept = zeroed = 0
    while off < end - 16:
        magic, _, head_size, fat_size = struct.unpack_from("<IHHQ", data, off)
        if magic != FATBIN_MAGIC:
            off += 8  # fatbins are 8-aligned; padding between them
            continue
        entry, stop = off + head_size, off + head_size + fat_size
        while entry < stop:
            kind, _, entry_head, payload = struct.unpack_from("<HHIQ", data, entry)
            arch = struct.unpack_from("<I", data, entry + 28)[0]
            body = entry + entry_head
            if kind == ELF_KIND and arch == keep_arch:
                kept += payload
            elif kind == ELF_KIND:
                data[body:body + payload] = bytes(payload)
                zeroed += payload
            else:
                sys.exit(f"slim_fatbin: entry of kind {kind} (PTX?) in {path}; not slimming a library that JITs")
            entry = body + payload
        off = stop
    if not kept:
        sys.exit(f"slim_fatbin: {path} has no sm_{keep_arch} cubin; it would not run there")
    open(path, "wb").write(data)
    return kept, zeroed


if __name__ == "__main__":
    kept, zeroed = slim(sys.argv[1], int(sys.argv[2]))
    print(f"slim_fatbin: kept {kept / 1e6:.1f} MB of sm_{sys.argv[2]} code, zeroed {zeroed / 1e6:.1f} MB")
