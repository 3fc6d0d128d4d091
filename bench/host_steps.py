"""Benchmark part 8: the node's own work on each slice around the network, in ms per 512x512 slice, each against
the way it was done before (the peer, in the same run):

- decode: a stored slice to int16 HU, from the file's 16-bit words (dicomio._native_words) against pydicom's
  pixel_array;
- restore: the network's 256 px probabilities to uint8 labels at 512 px, one class plane at a time
  (preprocess.restore_labels) against OpenCV's resize of all classes together and the argmax;

and on each instance a receiver takes in:

- read: the P-DATA PDUs of one slice (as storescu sends them, 128 KiB each) read from a socket into one buffer
  each (the receivers' upper layer) against pynetdicom's reader, 4096 bytes at a time; the reader thread's CPU ms;
- check: decoding a received slice's dataset, checking it (dicomio.check_dataset) and taking the header facts the
  index keeps, one series in order from a fresh start, with the values decoded before left undecoded against every
  value decoded.

On two cores decode and restore run beside ONNX Runtime, so each millisecond there is taken from the network;
reading is a receiver's, beside the sender's. Run alone:
`python -m bench.host_steps [folder of .dcm files] [model.onnx]` (default: bench/work's study and model)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from bench.common import best_interleaved

ROUNDS = 3


def run(files: list[Path], model: Path, slices: int = 40) -> dict:
    from livernode.imaging import dicomio
    from livernode.imaging.dicomio import read_dataset
    from livernode.imaging.preprocess import restore_labels, restore_probabilities
    from livernode.inference.runner import Segmenter

    files = files[:slices]
    words = dicomio._native_words

    def decode_words():
        return [dicomio.hu_int16_of(read_dataset(f, checked=True), str(f)) for f in files]

    def decode_pydicom():
        dicomio._native_words = lambda ds: None  # pydicom's pixel_array for every slice
        try:
            return [dicomio.hu_int16_of(read_dataset(f, checked=True), str(f)) for f in files]
        finally:
            dicomio._native_words = words

    fast, slow = best_interleaved(decode_words, decode_pydicom, ROUNDS)
    hu = np.stack(decode_words())
    if not np.array_equal(hu, np.stack(decode_pydicom())):
        raise RuntimeError("the two decodings differ")
    if words(read_dataset(files[0], checked=True)) is None:
        raise RuntimeError(f"{files[0]}: not an uncompressed 16-bit slice; the fast decoding was not measured")

    seg = Segmenter(model, providers="cpu")
    prob = seg.run(seg.inputs(hu, len(hu), 0, len(hu), 0))
    shape = hu.shape[1:]

    def by_plane():
        return [restore_labels(prob[i:i + 2], shape) for i in range(0, len(prob), 2)]

    def all_classes():
        return [restore_probabilities(prob[i:i + 2], shape).argmax(-1) for i in range(0, len(prob), 2)]

    planes, together = best_interleaved(by_plane, all_classes, ROUNDS)
    agreement = float((np.concatenate(by_plane()) == np.concatenate(all_classes())).mean())
    n = len(files)
    read, read_pynetdicom = _socket_read(files[0])
    check, check_all = _check(files)
    return {"slices": n, "network_px": int(prob.shape[1]),
            "check_ms_per_instance": check, "check_every_value_ms_per_instance": check_all,
            "read_cpu_ms_per_instance": read, "read_pynetdicom_cpu_ms_per_instance": read_pynetdicom,
            "decode_ms_per_slice": 1000 * fast / n, "decode_pydicom_ms_per_slice": 1000 * slow / n,
            "restore_ms_per_slice": 1000 * planes / n, "restore_all_classes_ms_per_slice": 1000 * together / n,
            "restore_agreement": agreement}


def _check(files: list[Path]) -> tuple[float, float]:
    """ms per instance of what a receiver does with a slice's dataset bytes before storing them (decode, check,
    header facts), over `files` as one series arriving in order: values decoded before left undecoded
    (dicomio._DECODED and headers._PLAIN, emptied before each round), and every value decoded."""
    import pydicom
    from pynetdicom.dsutils import encode

    from livernode.daemon.ingest_scp import decode_dataset
    from livernode.imaging import dicomio
    from livernode.imaging import headers
    from livernode.imaging.headers import header_facts

    received = []
    for f in files:
        ts = pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID
        received.append((encode(pydicom.dcmread(f), ts.is_implicit_VR, ts.is_little_endian), ts))

    def check() -> list:
        return [header_facts(dicomio.check_dataset(decode_dataset(body, ts), "bench", transfer_syntax=ts))
                for body, ts in received]

    def remembered() -> list:
        dicomio._DECODED.clear()
        headers._PLAIN.clear()
        return check()

    key = dicomio.decoded_key

    def every_value() -> list:
        dicomio.decoded_key = lambda raw, charset: None
        try:
            return check()
        finally:
            dicomio.decoded_key = key

    fast, slow = best_interleaved(remembered, every_value, ROUNDS)
    if remembered() != every_value() or None in remembered():
        raise RuntimeError("the header facts differ between the two ways of checking")
    return 1000 * fast / len(received), 1000 * slow / len(received)


def _socket_read(file: Path, instances: int = 200) -> tuple[float, float]:
    """The reader thread's CPU ms per instance, the receivers' upper layer (upper_layer.read_pdu's reader) and
    pynetdicom's AssociationSocket, for `instances` slices the size of `file`'s dataset sent over a socket pair in
    128 KiB PDUs."""
    import queue
    import resource
    import socket
    import threading
    from types import SimpleNamespace

    from pynetdicom.transport import AssociationSocket

    from livernode.daemon.upper_layer import _read_exactly

    pdu = 131066
    pieces = [min(pdu, file.stat().st_size - i) for i in range(0, file.stat().st_size, pdu)]

    def pynetdicom_reader(sock):
        return AssociationSocket(SimpleNamespace(dul=SimpleNamespace(event_queue=queue.Queue())),
                                 client_socket=sock).recv

    def ours(sock):
        return lambda n: _read_exactly(sock, n)

    def cpu_ms(reader) -> float:
        a, b = socket.socketpair()
        payload = bytes(pdu)

        def send():
            for _ in range(instances):
                for n in pieces:
                    b.sendall(payload[:n])

        sender = threading.Thread(target=send)
        sender.start()
        recv = reader(a)
        t0 = resource.getrusage(resource.RUSAGE_THREAD)
        got = sum(len(recv(n)) for _ in range(instances) for n in pieces)
        t1 = resource.getrusage(resource.RUSAGE_THREAD)
        a.close()
        sender.join(timeout=30)
        b.close()
        if got != instances * sum(pieces):
            raise RuntimeError(f"{reader.__name__} read {got} of {instances * sum(pieces)} bytes")
        return 1000 * (t1.ru_utime + t1.ru_stime - t0.ru_utime - t0.ru_stime) / instances

    cpu_ms(ours), cpu_ms(pynetdicom_reader)  # warm-up
    bulk = min(cpu_ms(ours) for _ in range(ROUNDS))
    return bulk, min(cpu_ms(pynetdicom_reader) for _ in range(ROUNDS))


if __name__ == "__main__":
    from bench.run import WORK

    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else WORK / "study-200"
    model = Path(sys.argv[2]) if len(sys.argv) > 2 else WORK / "trained-256.onnx"
    print(json.dumps(run(sorted(folder.rglob("*.dcm")), model), indent=1))
