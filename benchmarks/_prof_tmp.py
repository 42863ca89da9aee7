import sys, torch
sys.path.insert(0, "benchmarks")
import moe_layer as b
from moecore.moe.layer import MoELayer
from torch.profiler import profile, ProfilerActivity
for name in sys.argv[1:]:
    shape = b.CONFIGS[name]
    cfg = b.make_config(shape, torch.bfloat16, "auto")
    torch.manual_seed(0)
    with torch.device("cuda"):
        layer = MoELayer(cfg)
        with torch.no_grad():
            layer.router.weight.normal_(0, shape["hidden"] ** -0.5)
    x = torch.randn(shape["tokens"], 1, shape["hidden"], device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)
    for _ in range(3):
        out, _ = layer(x); out.backward(dy)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        for _ in range(3):
            out, _ = layer(x); out.backward(dy)
        torch.cuda.synchronize()
    print("=====", name)
    print(p.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
