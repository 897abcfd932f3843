# The optional compiled helpers (qedkit/_speedups.c).
def mark_clusters(
    table: bytes | bytearray | memoryview, used: bytearray, cluster_bits: int, /
) -> tuple[int, int] | None: ...
