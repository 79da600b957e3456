"""Delta-rule programs written out for the tests (spellings of real code, with knobs that break one piece)."""
import torch


def blocked(q, k, v, beta, BM, BN, bug=None):
    """The blocked form as fla writes it (fla.ops.delta_rule.naive.delta_rule_parallel, its output only),
    with out-of-place accumulations; ``bug`` changes one piece."""
    b, h, L, d = q.shape
    q = q * d ** -0.5
    v = v * beta[..., None]
    kb = k * beta[..., None]
    q, k, v, kb = (x.reshape(b, h, L // BN, BN, -1) for x in (q, k, v, kb))
    strict = torch.triu(torch.ones(BN, BN, dtype=torch.bool), diagonal=0)
    T = -(kb @ k.transpose(-1, -2)).masked_fill(strict, 0)
    for i in range(1, BN):
        T[..., i, :i] = T[..., i, :i].clone() + (T[..., i, :, None].clone() * T[..., :, :i].clone()).sum(-2)
    T = T + torch.eye(BN)
    lower = torch.triu(torch.ones(BN, BN, dtype=torch.bool), diagonal=1)
    A = (q @ k.transpose(-1, -2)).masked_fill(lower, 0) @ T
    k_mask = lower if bug == "k_transform" else strict
    k_end = k - ((k @ k.transpose(-1, -2)).masked_fill(k_mask, 0) @ T).transpose(-1, -2) @ kb
    q = q - A @ kb
    o_intra = A @ v
    q, k, k_end, v, kb, o_intra = (x.reshape(b, h, L, -1) for x in (q, k, k_end, v, kb, o_intra))
    keys = k if bug == "plain_keys" else k_end
    o = torch.empty_like(v)
    for i in range(0, L, BM):
        q_i, o_i = q[:, :, i:i + BM], o_intra[:, :, i:i + BM]
        js = list(range(i + BM - 2 * BN, i - BN, -BN)) + list(range(i - BN, -BN, -BN))
        if bug == "skip_first_chunk":
            js = js[:-1]
        for j in js:
            A_ij = q_i @ keys[:, :, j:j + BN].transpose(-1, -2)
            keep = torch.arange(i, i + BM) >= j + (BN - 1 if bug == "mask" else BN)
            A_ij = A_ij.masked_fill(~keep[:, None], 0)
            if bug == "order":
                q_i = q_i - A_ij @ kb[:, :, j:j + BN]
                o_i = o_i + (q_i @ keys[:, :, j:j + BN].transpose(-1, -2)).masked_fill(~keep[:, None], 0) \
                    @ v[:, :, j:j + BN]
                continue
            if bug != "no_carry":
                q_i = q_i - A_ij @ (v if bug == "values_for_keys" else kb)[:, :, j:j + BN]
            o_i = o_i + A_ij @ v[:, :, j:j + BN]
        o[:, :, i:i + BM] = o_i
    return o


def rwkv7_loop(r, w, k, v, a, b, key_matrix=False):
    """RWKV-7's time mixing as a step loop over a batch of (H, V, K) states (the RWKV-LM v7 demo's recurrence
    with a batch axis): decayed along the key axis by w = exp(−exp(·)), the low-rank term read from the
    state before the decay with a and erased along b, (state @ a) @ b, the input v ⊗ k as a matmul of views,
    the readout state @ r viewed back; ``key_matrix`` forms a ⊗ b first and contracts the state with it
    (state @ ab, as the demo does)."""
    B, T, H, N = r.shape
    w = torch.exp(-torch.exp(w.float()))
    state = r.new_zeros(B, H, N, N)
    out = r.new_zeros(B, T, H, N)
    for t in range(T):
        kk, rr = k[:, t].view(B, H, 1, N), r[:, t].view(B, H, N, 1)
        vv, aa, bb = v[:, t].view(B, H, N, 1), a[:, t].view(B, H, N, 1), b[:, t].view(B, H, 1, N)
        low_rank = state @ (aa @ bb) if key_matrix else state @ aa @ bb
        state = state * w[:, t, :, None, :] + low_rank + vv @ kk
        out[:, t] = (state @ rr).view(B, H, N)
    return out, state


def rwkv7_demo_seq(r, w, k, v, kk, a, state):
    """RWKV-7's time mixing as the RWKV-LM v7 demo's CUDA-free sequence mode writes it: one sequence of rows
    (T, H·N), a (H, N, N) state, w = exp(−e^{−1/2}·σ(·)), the key matrix ab = (−κ̂) ⊗ (κ̂ ⊙ a) formed per step
    and cast with ``.float()``, the input v ⊗ k likewise, the readout of the state cast to the rows' dtype
    written row by row into a buffer."""
    T = r.shape[0]
    H, N, _ = state.shape
    out = torch.zeros_like(r)
    w = torch.exp(-0.606531 * torch.sigmoid(w.float()))
    for t in range(T):
        r_t, w_t, k_t, v_t, kk_t, a_t = r[t], w[t], k[t], v[t], kk[t], a[t]
        vk = v_t.view(H, N, 1) @ k_t.view(H, 1, N)
        ab = (-kk_t).view(H, N, 1) @ (kk_t * a_t).view(H, 1, N)
        state = state * w_t.view(H, 1, N) + state @ ab.float() + vk.float()
        out[t] = (state.to(dtype=r.dtype) @ r_t.view(H, N, 1)).view(H * N)
    return out, state
