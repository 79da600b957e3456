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
