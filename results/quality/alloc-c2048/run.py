# experiment: Gemma-3-270M layer costs measured at 2048 tokens (1 chunk) instead of 512 (1 chunk),
# same base profile; then the 2.75- and 3.25-bit allocations from them, beside a copy of the model
import shutil, time
from pathlib import Path
from tqkv import alloc, assets, profile
src = assets.model_arg("gemma3"); d = Path("/tmp/gexp")
m = d / src.name
if not m.exists(): shutil.copy(src, m)
base_src = src.with_name(src.name.removesuffix(".gguf") + ".tqkv.gguf")
base = m.with_name(m.name.removesuffix(".gguf") + ".tqkv.gguf"); shutil.copy(base_src, base)
t0 = time.time()
costs = alloc.measure(m, base, [assets.text(assets.CALIBRATION_TEXT)], n_ctx=2048, n_chunks=1, cache=d / "alloc")
print(f"costs in {time.time()-t0:.0f} s")
for b in (2.75, 3.25):
    p = alloc.write(m, base, costs, b, alloc.alloc_path(m, b))
    print(p, alloc.describe(profile.read(p).alloc, costs))
