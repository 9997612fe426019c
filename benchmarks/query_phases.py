"""Where the time of ``source-proj query STORE --spec SPEC`` goes, phase by phase, in one process.

    python benchmarks/query_phases.py [--store runs/digits/digits.sp] [--spec examples/digits/digits.py]
        [--top-k 10] [--threads 1]

Times, in the order the CLI meets them: importing torch, importing source_proj, loading the spec and
its query data, opening the store with an Attributor, and ``top_k`` of all queries and of the first
20; then says which of the slow imports nobody needs (scikit-learn, torch's compiler package
``torch._dynamo``, matplotlib) the process holds. Build the store first with ``./dev.sh demo``.
"""

from __future__ import annotations

import argparse
import sys
import time

T0 = time.perf_counter()
import torch  # noqa: E402

T_TORCH = time.perf_counter()
import source_proj as sp  # noqa: E402
from source_proj.spec import load_spec  # noqa: E402

T_LIB = time.perf_counter()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default="runs/digits/digits.sp")
    parser.add_argument("--spec", default="examples/digits/digits.py")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    phases = {"import torch": T_TORCH - T0, "import source_proj": T_LIB - T_TORCH}
    t = time.perf_counter()
    spec = load_spec(args.spec)
    queries = spec.query_data()
    phases["spec and its query data"] = time.perf_counter() - t
    t = time.perf_counter()
    attributor = sp.Attributor(sp.Store.open(args.store), spec.build_model(), spec.build_task(), device="cpu",
                               progress=False)  # fmt: skip
    phases["open the store"] = time.perf_counter() - t
    for count in (len(queries), min(20, len(queries))):
        t = time.perf_counter()
        attributor.top_k(torch.utils.data.Subset(queries, list(range(count))), args.top_k)
        phases[f"top_k of {count} queries"] = time.perf_counter() - t
    for name, seconds in phases.items():
        print(f"{name:28s} {seconds:6.2f} s")
    held = [name for name in ("sklearn", "torch._dynamo", "matplotlib") if name in sys.modules]
    print(f"imported as well: {', '.join(held) or 'none of sklearn, torch._dynamo, matplotlib'}")


if __name__ == "__main__":
    main()
