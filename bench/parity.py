"""A reward for random-weight models (bench/gpu_check.py): the parity of the completion's checksum. Noise scores
about half right, so every objective has a signal and T-SPMO's trees have credit to compute."""
import zlib


def parity(completion: str, answer) -> float:
    return float(zlib.crc32(completion.encode()) % 2)
