# The tables of docs/scaling.md: per rank, per step (forward + backward), under the assumptions
# printed there. python3 scripts/scaling_tables.py; no dependencies.
D, b, g = 128, 2, 4          # dims; feature bytes (bf16); gradient bytes of gather-with-grad (f32)
F, BW = 400e12, 50e9         # assumptions: flop/s per rank, all-gather bandwidth per rank (bytes/s)
GiB, MiB, MB = 2**30, 2**20, 1e6
ROWS = [(N, W) for N in (65536, 262144, 1048576) for W in (8, 64, 512)]

def sig(x, n=3):
    """n significant digits; whole numbers of more than n digits as they are."""
    if x >= 10**n:
        return str(int(x)) if x == int(x) else str(int(float(f"{x:.{n}g}")))
    return f"{x:#.{n}g}".rstrip(".")

def table(header, cells):
    print("| N | W | n | " + " | ".join(header) + " |")
    print("|---:|---:|---:|" + "---:|" * len(header))
    for N, W in ROWS:
        n = N // W
        print(f"| {N} | {W} | {n} | " + " | ".join(sig(c) for c in cells(N, n)) + " |")
    print()

ours_flops = lambda N, n: 6 * n * N * D
full_flops = lambda N, n: 6 * N * N * D
ours_bytes = lambda N, n: (N - n) * (D * b + 8 + 32)        # Z, labels, 4 f64 statistics
gwg_bytes = lambda N, n: (N - n) * (D * b + 8 + D * g)      # Z, labels, reduce-scatter of dZ
ring_bytes = lambda N, n: 3 * (N - n) * D * b               # Z forward, ~2x that backward

table(["sharded (TFLOP)", "full loss (TFLOP)", "gathered Z (GiB)", "ring blocks (MiB)",
       "N×N buffer (GiB)", "n×N buffer (GiB)"],
      lambda N, n: [ours_flops(N, n) / 1e12, full_flops(N, n) / 1e12, N * D * b / GiB,
                    3 * n * D * b / MiB, 4 * N * N / GiB, 4 * n * N / GiB])
table(["sharded (MB)", "gather-with-grad (MB)", "ring (MB)"],
      lambda N, n: [ours_bytes(N, n) / MB, gwg_bytes(N, n) / MB, ring_bytes(N, n) / MB])
table(["sharded: compute", "sharded: gather", "full loss: compute", "gather-with-grad: comm.", "ring: comm."],
      lambda N, n: [ours_flops(N, n) / F * 1e3, ours_bytes(N, n) / BW * 1e3,
                    full_flops(N, n) / F * 1e3, gwg_bytes(N, n) / BW * 1e3,
                    ring_bytes(N, n) / BW * 1e3])

N8, W8 = 10**8, 512
print("N = 1e8: Z (GB)", sig(N8 * D * b / 1e9), "; dZ in f32 (GB)", sig(N8 * D * 4 / 1e9),
      "; compute at W = 512 (s)", sig(6 * (N8 / W8) * N8 * D / F))
print("rows per rank below which the gather outlasts the compute, F·(D·b + 40)/(6·D·BW):",
      sig(F * (D * b + 40) / (6 * D * BW)), "; at 10x the bandwidth:", sig(F * (D * b + 40) / (6 * D * 10 * BW)))
print("rows per rank that fill an H200's 132 SMs x 3 backward blocks of 64 rows:", 132 * 3 * 64)
print("kernel-model.md: 6·N²·D at N = 65536 in 7-11 ms (TFLOP/s):",
      sig(6 * 65536**2 * 128 / 11e-3 / 1e12), "-", sig(6 * 65536**2 * 128 / 7e-3 / 1e12))
print("PyTorch original at N = 8192, 2091 MB peak (benchmarks.md), in N×N f32 buffers:",
      sig(2091e6 / (4 * 8192**2)))
