"""``--attention-backend`` on CUDA: each name runs its SDPA kernel and they agree."""

import pytest
import torch

from moecore.kernels.attention import core_attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# The autograd node each pinned kernel leaves behind (math leaves plain matmul/softmax nodes).
NODES = {"flash": "ScaledDotProductFlashAttentionBackward",
         "fused": "ScaledDotProductCudnnAttentionBackward", "unfused": None}


def _nodes(t: torch.Tensor) -> set[str]:
    seen, stack, names = set(), [t.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        stack.extend(f for f, _ in fn.next_functions)
    return names


@pytest.mark.parametrize("s,b,nh,ng,d", [(2048, 2, 16, 16, 64), (333, 3, 8, 2, 128)])
def test_backends_pin_their_kernel_and_agree(s, b, nh, ng, d):
    g = torch.Generator(device="cuda").manual_seed(0)
    base = [torch.randn(s, b, n, d, device="cuda", generator=g, dtype=torch.bfloat16)
            for n in (nh, ng, ng)]
    dy = torch.randn(s, b, nh * d, device="cuda", generator=g, dtype=torch.bfloat16)
    results = {}
    for name, node in NODES.items():
        q, k, v = (t.clone().requires_grad_() for t in base)
        out = core_attention(q, k, v, backend=name)
        names = _nodes(out)
        sdpa_nodes = {n for n in names if n.startswith("ScaledDotProduct")}
        assert sdpa_nodes == ({node + "0"} if node else set()), (name, sdpa_nodes)
        out.backward(dy)
        results[name] = [out, q.grad, k.grad, v.grad]
    for name in ("flash", "fused"):
        for got, want in zip(results[name], results["unfused"]):
            rel = ((got.double() - want.double()).norm() / want.double().norm()).item()
            assert rel < 3e-2, (name, rel)
