#!/usr/bin/env python3
"""A model's measured layer costs and the allocations they give, as markdown.

    python scripts/alloc_report.py gemma3 --cost-chunks 1 --budgets 2.5 2.75 3.25 > results/quality/alloc-gemma3.md

The costs come from tqkv's cache when `tqkv calibrate MODEL --budget ...` measured them with the
same settings (else they are measured now).
"""

from __future__ import annotations

import argparse

from tqkv import alloc, assets, profile


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--text", nargs="+", default=[assets.CALIBRATION_TEXT])
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--cost-chunks", type=int, default=2)
    ap.add_argument("--budgets", type=float, nargs="+", default=[2.5, 2.75, 3.25])
    a = ap.parse_args()
    model = assets.model_arg(a.model)
    texts = [assets.text_arg(t) for t in a.text]
    costs = alloc.measure(model, profile.ensure(model), texts, a.ctx, a.cost_chunks)
    allocs = {b: alloc.allocate(costs, b) for b in a.budgets}
    c = costs.monotone()
    print(f"# Layer costs and bit allocations: {model.name}\n")
    print(f"Mean KLD above the floor ({costs.floor:.5f}, every layer f16 through the TurboQuant transforms) "
          f"when one layer's K or V cache is quantized, the rest f16; {', '.join(p.name for p in texts)}, "
          f"{a.cost_chunks} x {a.ctx} tokens (`alloc.measure`), after `Costs.monotone`. Columns "
          f"`alloc B`: the type each allocation gives the layer.\n")
    types = " | ".join(f"{kv} {t}" for kv in ("K", "V") for t in alloc.TYPES)
    budgets = " | ".join(f"alloc {b:g}" for b in a.budgets)
    print(f"| layer | {types} | {budgets} |")
    print("|---:|" + "---:|" * (2 * len(alloc.TYPES)) + "---|" * len(a.budgets))
    for i, il in enumerate(costs.layers):
        vals = " | ".join(f"{(c.v if kv == 'V' else c.k)[t][i]:.4f}" for kv in ("K", "V") for t in alloc.TYPES)
        picks = " | ".join(f"{al.k_types[il]}/{al.v_types[il]}" for al in allocs.values())
        print(f"| {il} | {vals} | {picks} |")
    print("\n| budget | allocation |\n|---|---|")
    for b, al in allocs.items():
        print(f"| {b:g} | {alloc.describe(al, costs)} |")
    uniform = {f"{k}/{v}": profile.Alloc(0.0, tuple(k if il in costs.layers else "" for il in range(costs.n_layer)),
                                       tuple(v if il in costs.layers else "" for il in range(costs.n_layer)))
               for k, v in (("tq3_0", "tq2_0"), ("tq3_0", "tq3_0"), ("tq4_0", "tq4_0"))}
    for name, u in uniform.items():
        print(f"| uniform {name} | {alloc.describe(u, costs)} |")


if __name__ == "__main__":
    main()
