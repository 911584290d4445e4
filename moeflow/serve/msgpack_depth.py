"""How deep a msgpack message nests, found before decoding it.

Decoding a message nested thousands deep exhausts Python's recursion (in msgpack itself, or
in whatever walks the result), so the request server refuses such a message first, from
its bytes alone.
"""

from __future__ import annotations

import re


def _scalar_sizes() -> tuple[int, ...]:
    """Per msgpack head byte: the whole object's size when the head alone fixes it, else 0
    (containers, str8/16/32, bin, ext, and the unused 0xc1)."""
    size = [0] * 256
    for head in (*range(0x00, 0x80), *range(0xe0, 0x100), 0xc0, 0xc2, 0xc3):
        size[head] = 1  # fixints, nil, false, true
    for head in range(0xa0, 0xc0):
        size[head] = 1 + (head & 0x1f)  # fixstr
    for head, num_bytes in ((0xca, 5), (0xcb, 9), (0xcc, 2), (0xcd, 3), (0xce, 5), (0xcf, 9),
                            (0xd0, 2), (0xd1, 3), (0xd2, 5), (0xd3, 9), (0xd4, 3), (0xd5, 4),
                            (0xd6, 6), (0xd7, 10), (0xd8, 18)):
        size[head] = num_bytes  # floats, ints, fixext
    return tuple(size)


_SCALAR_SIZE = _scalar_sizes()
# head -> (bytes of the big-endian length, bytes between it and the payload: ext's type)
_SIZED = {0xc4: (1, 0), 0xc5: (2, 0), 0xc6: (4, 0), 0xd9: (1, 0), 0xda: (2, 0), 0xdb: (4, 0),
          0xc7: (1, 1), 0xc8: (2, 1), 0xc9: (4, 1)}
# head -> (bytes of the big-endian count, objects per count: a map entry is two)
_CONTAINERS = {0xdc: (2, 1), 0xdd: (4, 1), 0xde: (2, 2), 0xdf: (4, 2)}
# runs of one-byte objects, skipped at once; the second also takes empty containers
_ONE_BYTE_RUN = re.compile(rb"[\x00-\x7f\xa0\xc0\xc2\xc3\xe0-\xff]+")
_ONE_BYTE_RUN_OR_EMPTY = re.compile(rb"[\x00-\x80\x90\xa0\xc0\xc2\xc3\xe0-\xff]+")


def nests_deeper(body: bytes, max_depth: int) -> bool:
    """Whether the msgpack object at the start of `body` nests containers more than
    `max_depth` deep (a top-level map is depth 1). Reads heads only, without recursion, in
    time linear in len(body); answers False at bytes that are not msgpack or run short,
    which decoding then refuses."""
    return _scan(body, max_depth, None) == "deep"


def too_many_containers(body: bytes, max_containers: int) -> bool:
    """Whether the msgpack object at the start of `body` holds more than `max_containers`
    maps and arrays, empty ones too (decoding megabytes of `[]` takes seconds: a valid
    request holds a few). Same reading as `nests_deeper`."""
    return _scan(body, 1 << 30, max_containers) == "many"


def _scan(body: bytes, max_depth: int, max_containers: int | None) -> str | None:
    """"deep", "many" or None (fine, or not msgpack: decoding refuses that)."""
    end, pos = len(body), 0
    containers = 0
    left = [1]  # objects still to read in each open container, innermost last
    while left:
        num_left = left[-1]
        if num_left == 0:
            left.pop()
            continue
        if pos >= end:
            return None
        head = body[pos]
        size = _SCALAR_SIZE[head]
        if size == 1 or head in (0x80, 0x90):
            run = (_ONE_BYTE_RUN_OR_EMPTY if len(left) <= max_depth else _ONE_BYTE_RUN
                   ).match(body, pos, pos + num_left)
            if run is not None:
                num_run = run.end() - pos
                if max_containers is not None:  # the run's empty maps and arrays
                    containers += (body.count(b"\x80", pos, run.end())
                                   + body.count(b"\x90", pos, run.end()))
                    if containers > max_containers:
                        return "many"
                pos, left[-1] = pos + num_run, num_left - num_run
                continue
        left[-1] = num_left - 1
        if size:
            pos += size
            continue
        if 0x80 <= head <= 0x9f:  # fixmap, fixarray
            count, pos = (head & 0x0f) * (2 if head < 0x90 else 1), pos + 1
        elif head in _CONTAINERS:
            width, per = _CONTAINERS[head]
            count = int.from_bytes(body[pos + 1:pos + 1 + width], "big") * per
            pos += 1 + width
        elif head in _SIZED:
            width, gap = _SIZED[head]
            pos += 1 + width + gap + int.from_bytes(body[pos + 1:pos + 1 + width], "big")
            continue
        else:  # 0xc1 is never used
            return None
        left.append(count)
        containers += 1
        if len(left) - 1 > max_depth:
            return "deep"
        if max_containers is not None and containers > max_containers:
            return "many"
    return None
