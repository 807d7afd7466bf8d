"""A minimal TensorBoard scalar writer that needs neither TensorFlow nor tensorboardX.

Event files are TFRecord streams of ``Event`` protocol buffers; the few fields used here
(wall_time, step, file_version, summary.value{tag, simple_value}, session_log.status) are encoded
by hand.
"""

from __future__ import annotations

import os
import socket
import struct
import time


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
        table.append(crc)
    return tuple(table)


_TABLE = _crc32c_table()


def crc32c(payload: bytes) -> int:
    """CRC-32C (Castagnoli) of ``payload``."""
    crc = 0xFFFFFFFF
    for byte in payload:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(payload: bytes) -> int:
    crc = crc32c(payload)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    return _varint((number << 3) | wire_type) + payload


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _field(number, 2, _varint(len(payload)) + payload)


#: ``SessionLog.START``: TensorBoard drops the events of every earlier file whose step is >= this
#: event's step (what a restarted run writes so that the steps it redoes are not shown twice).
SESSION_START = 1


def encode_event(wall_time: float, step: int, scalars: dict | None = None, file_version: str | None = None,
                 session_status: int | None = None) -> bytes:
    """Serialised ``Event`` proto with ``scalars`` (tag -> float) as a summary, or a file version,
    or a ``SessionLog`` status."""
    out = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(int(step)))
    if file_version is not None:
        out += _length_delimited(3, file_version.encode())
    if session_status is not None:
        out += _length_delimited(7, _field(1, 0, _varint(session_status)))
    if scalars:
        values = b"".join(
            _length_delimited(1, _length_delimited(1, tag.encode()) + _field(2, 5, struct.pack("<f", value)))
            for tag, value in scalars.items()
        )
        out += _length_delimited(5, values)
    return out


def frame(record: bytes) -> bytes:
    """One TFRecord: length, masked CRC of the length, data, masked CRC of the data."""
    length = struct.pack("<Q", len(record))
    return length + struct.pack("<I", _masked_crc(length)) + record + struct.pack("<I", _masked_crc(record))


class EventWriter:
    """Writes ``events.out.tfevents.<time>.<host>`` in ``logdir``; one record per call.

    ``purge_step``: a run resumed from a checkpoint passes the first step it will redo; a
    ``SessionLog.START`` event at that step makes TensorBoard discard what earlier files logged
    from there on (the steps lost when the previous run was killed).
    """

    def __init__(self, logdir: str, purge_step: int | None = None):
        os.makedirs(logdir, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
        self.path = os.path.join(logdir, name)
        self._file = open(self.path, "ab")
        self._file.write(frame(encode_event(time.time(), 0, file_version="brain.Event:2")))
        if purge_step is not None:
            self._file.write(frame(encode_event(time.time(), purge_step, session_status=SESSION_START)))
        self._file.flush()

    def scalars(self, step: int, values: dict) -> None:
        self._file.write(frame(encode_event(time.time(), step, scalars=values)))
        self._file.flush()

    def close(self) -> None:
        self._file.close()
