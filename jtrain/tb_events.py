"""TensorBoard event files without TensorFlow: TFRecord framing (masked CRC-32C) around
hand-encoded `Event` protobufs for scalars, and a reader for the same files (tests and plots).

`jtrain.reporting.TensorBoardCallback` writes through `EventFileWriter`; the `tensorboard`
package reads the files (tested), so nothing here needs it.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Iterator


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum TFRecord uses; pure Python is fast enough for logs."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """TFRecord stores a rotated+offset CRC so a CRC of CRC-bearing data stays well mixed."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64 -> two's complement, as protobuf does
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _pb_bytes(field_num: int, payload: bytes) -> bytes:
    return _varint(field_num << 3 | 2) + _varint(len(payload)) + payload


def _encode_event(wall_time: float, step: int, *, file_version: str = "", scalars: dict | None = None) -> bytes:
    """`tensorflow.Event`: wall_time=1 (double), step=2 (int64), file_version=3, summary=5.

    `Summary.value`=1 holds `Value{tag=1 (string), simple_value=2 (float)}`.
    """
    event = _varint(1 << 3 | 1) + struct.pack("<d", wall_time) + _varint(2 << 3) + _varint(step)
    if file_version:
        event += _pb_bytes(3, file_version.encode())
    if scalars:
        values = b"".join(
            _pb_bytes(1, _pb_bytes(1, tag.encode()) + _varint(2 << 3 | 5) + struct.pack("<f", val))
            for tag, val in scalars.items()
        )
        event += _pb_bytes(5, values)
    return event


def _tfrecord(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data))


class EventFileWriter:
    """Appends scalar summaries to `log_dir/events.out.tfevents.<time>.<host>.<pid>.<n>`."""

    _count = 0

    def __init__(self, log_dir: str) -> None:
        os.makedirs(log_dir, exist_ok=True)
        EventFileWriter._count += 1
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.{self._count}"
        self.path = os.path.join(log_dir, name)
        self._file = open(self.path, "ab")
        self._write(_encode_event(time.time(), 0, file_version="brain.Event:2"))

    def _write(self, event: bytes) -> None:
        self._file.write(_tfrecord(event))
        self._file.flush()  # so a live TensorBoard sees each log as it happens

    def add_scalars(self, scalars: dict[str, float], step: int, wall_time: float | None = None) -> None:
        """One `Event` holding every scalar of this log call."""
        if scalars:
            self._write(_encode_event(time.time() if wall_time is None else wall_time, step, scalars=scalars))

    def add_scalar(self, tag: str, value: float, step: int, wall_time: float | None = None) -> None:
        self.add_scalars({tag: value}, step, wall_time)

    def close(self) -> None:
        self._file.close()


def read_tfrecords(path: str) -> Iterator[bytes]:
    """Yield each record's payload, checking both CRCs (a torn or corrupt file raises)."""
    with open(path, "rb") as f:
        while header := f.read(12):
            if len(header) < 12:
                raise ValueError(f"{path}: truncated record header")
            length_bytes, (length_crc,) = header[:8], struct.unpack("<I", header[8:])
            if masked_crc32c(length_bytes) != length_crc:
                raise ValueError(f"{path}: corrupt record length")
            data = f.read(struct.unpack("<Q", length_bytes)[0])
            footer = f.read(4)
            if len(footer) < 4 or masked_crc32c(data) != struct.unpack("<I", footer)[0]:
                raise ValueError(f"{path}: corrupt record data")
            yield data


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        result |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return result, pos


def _parse_proto(buf: bytes) -> dict[int, list]:
    """Minimal protobuf decoder: field number -> raw values (ints or bytes), enough for Events."""
    fields: dict[int, list] = {}
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        wire = key & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = buf[pos : pos + size], pos + size
        elif wire == 2:
            size, pos = _read_varint(buf, pos)
            value, pos = buf[pos : pos + size], pos + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        fields.setdefault(key >> 3, []).append(value)
    return fields


def read_tensorboard_scalars(path: str) -> list[tuple[int, str, float]]:
    """`(step, tag, value)` for every scalar in an event file, with no TensorBoard install."""
    scalars = []
    for record in read_tfrecords(path):
        event = _parse_proto(record)
        step = event.get(2, [0])[0]
        for summary in event.get(5, []):
            for value in _parse_proto(summary).get(1, []):
                fields = _parse_proto(value)
                if 2 in fields:
                    tag = fields[1][0].decode()
                    scalars.append((step, tag, struct.unpack("<f", fields[2][0])[0]))
    return scalars
