import numpy as np, torch, onnx
from sea_edge.kernels import sparse_index_op, sparse_index_ref
from sea_edge.config import SEAConfig, budget
from sea_edge.export.onnx_ops import custom_translation_table
from sea_edge.export.validate import ort_session

class M(torch.nn.Module):
    def __init__(s, cfg, H): super().__init__(); s.cfg, s.H = cfg, H
    def forward(s, probs, key_valid):
        S = key_valid.shape[1]
        n_cols, head_cap, span = budget(s.cfg, s.H, S)
        return sparse_index_op(probs, key_valid, n_cols, head_cap, S, s.cfg.causal, s.H * s.cfg.k, span)

H = 9
cfg = SEAConfig(k=64).resolve(True, 64); K = cfg.compressed_width
Td = torch.export.Dim("T", min=2, max=8192)
ex = (torch.rand(1, H, 300, K).softmax(-1), torch.ones(1, 300, dtype=torch.bool))
OUTF = "/work/main/.xfer/probe/mask_" + __import__("sys").argv[1] + ".onnx"
prog = torch.onnx.export(M(cfg, H), ex, dynamo=True, input_names=["probs", "key_valid"],
                         dynamic_shapes=({2: Td}, {1: Td}), optimize=False, custom_translation_table=custom_translation_table())
onnx.save(prog.model_proto, OUTF)
g = torch.Generator().manual_seed(0)
for T in (100, 256, 512, 1024):
    probs = (torch.randn(1, H, T, K, generator=g) * 6).softmax(-1)
    kv = torch.ones(1, T, dtype=torch.bool)
    n_cols, head_cap, span = budget(cfg, H, T)
    ref = sparse_index_ref(probs, n_cols, head_cap, T, True, kv, H * cfg.k, span)
    out = ort_session(OUTF).run(None, {"probs": probs.numpy(), "key_valid": kv.numpy()})[0]
    print(T, "zeros share", float((probs == 0).float().mean()), "budget", n_cols, head_cap, span, "cpu==ref", np.array_equal(out, ref.numpy()))
    np.savez(f"/work/main/.xfer/probe/in_T{T}.npz", probs=probs.numpy(), key_valid=kv.numpy())
