"""Triton kernels of the BGN/GBGN training passes (imported lazily by
:mod:`bgnorm.ops.triton_bgn`; this module imports triton).

Every kernel walks the *units* of an example (runs of Lu elements sharing one channel and one
group, see :class:`bgnorm.ops.plan.UnitsPlan`) in 2D tiles ``[BJ, BU]``: BJ consecutive
elements of each of BU units. Per tile column the channel, the group and so the statistics and
the affine are constants, so reductions are per-column sums and the elementwise passes load
their coefficients once per column. Two memory layouts of x, one index map each:

- NCHW (contiguous): unit u of example n starts at ``n*D + u*Lu``; a tile spans BU consecutive
  units, element j of a unit is at ``+ j``.
- channels last ((N, S, C) in memory): unit u = c*NS + su (NS = S/Lu units per channel) holds
  positions ``su*Lu + j`` of channel c, at ``n*D + (su*Lu + j)*C + c``; a tile spans BU
  consecutive channels at one ``su``, so its rows are contiguous in memory.

The reductions split each unit's Lu elements into SPLIT segments of SEG elements (a program
loops over N_ITER blocks of BJ), so that the grid fills the GPU even with one group and two
examples; they write per-(example, segment, unit) partials that a small merge kernel combines.
Statistics and sums are float32 whatever the input dtype. Only APIs stable across Triton
3.x are used (masked loads/stores, tl.sum, tl.where, constexpr power-of-two blocks). Grid and
loop sizes are not specialized (one compiled kernel serves every batch size and G); the
strides C, D and Lu are, so that aligned rows get vectorized loads.
"""

import triton
import triton.language as tl


@triton.jit
def _columns(slot, C, LU, NS, U, CB, CHANNELS_LAST: tl.constexpr, BU: tl.constexpr):
    """(unit ids, column mask, element offset of each column's first element in its example)
    of tile slot ``slot``."""
    if CHANNELS_LAST:
        su = slot // CB
        c = (slot % CB) * BU + tl.arange(0, BU)
        col_mask = c < C
        unit = c * NS + su
        col_off = su * LU * C + c
    else:
        unit = slot * BU + tl.arange(0, BU)
        col_mask = unit < U
        col_off = unit * LU
    return unit, col_mask, col_off


@triton.jit(do_not_specialize=["U", "CB", "NB", "SPLIT", "SEG", "N_ITER", "NS"])
def stats_partials_kernel(
    x_ptr, pmean_ptr, pm2_ptr,
    C, D, LU, NS, U, CB, NB, SPLIT, SEG, N_ITER,
    CHANNELS_LAST: tl.constexpr, BJ: tl.constexpr, BU: tl.constexpr,
):
    """Per (example, segment, unit): mean and M2 (sum of squared deviations) of the segment.

    Each block of BJ elements gets its mean from its sum and its M2 from its centred squares in
    registers, and is merged into the running (count, mean, M2) by Chan's formula: no
    E[x^2] - E[x]^2 cancellation. Values are shifted by the segment's first element of each
    unit, so block sums add small differences (inputs like 1e4 + N(0, 1) keep their digits)
    and the partial mean is rounded once."""
    pid = tl.program_id(0)
    slot = pid % NB
    t = pid // NB
    sp = t % SPLIT
    n = t // SPLIT
    unit, col_mask, col_off = _columns(slot, C, LU, NS, U, CB, CHANNELS_LAST, BU)
    if CHANNELS_LAST:  # offset between consecutive elements of a unit
        jstride = C
    else:
        jstride = 1
    xb = x_ptr + n.to(tl.int64) * D
    jr = tl.arange(0, BJ)
    cnt = tl.zeros([BU], dtype=tl.float32)
    mean = tl.zeros([BU], dtype=tl.float32)
    m2 = tl.zeros([BU], dtype=tl.float32)
    j0 = sp * SEG
    shift = tl.load(xb + col_off + j0 * jstride, mask=col_mask, other=0.0).to(tl.float32)
    for it in range(0, N_ITER):
        j = j0 + it * BJ + jr
        jm = j < LU
        m = jm[:, None] & col_mask[None, :]
        x = tl.load(xb + (col_off[None, :] + j[:, None] * jstride), mask=m, other=0.0)
        x = tl.where(m, x.to(tl.float32) - shift[None, :], 0.0)
        # the block's valid rows in closed form (a reduction across the program's warps less)
        bc = tl.minimum(tl.maximum(LU - (j0 + it * BJ), 0), BJ).to(tl.float32)
        bmean = tl.sum(x, axis=0) / tl.maximum(bc, 1.0)
        dev = tl.where(m, x - bmean[None, :], 0.0)
        bm2 = tl.sum(dev * dev, axis=0)
        tot = cnt + bc
        w = bc / tl.maximum(tot, 1.0)
        delta = bmean - mean
        mean = mean + delta * w
        m2 = m2 + bm2 + delta * delta * cnt * w
        cnt = tot
    out = (n * SPLIT + sp) * U + unit
    tl.store(pmean_ptr + out, shift + mean, mask=col_mask)
    tl.store(pm2_ptr + out, m2, mask=col_mask)


@triton.jit(do_not_specialize=["G", "U", "UPG", "E", "SPLIT", "SEG"])
def stats_merge_kernel(
    pmean_ptr, pm2_ptr, mean_ptr, var_ptr, rstd_ptr, rm_ptr, rv_ptr,
    G, U, UPG, E, SPLIT, SEG, LU, inv_count, eps, momentum, unbias,
    BK: tl.constexpr, HAS_RUNNING: tl.constexpr,
):
    """One program per statistic q = (batch group p, group g): merges the partials of the E
    examples, SPLIT segments and UPG units of (p, g), centred on the first partial's mean
    (two passes over the partials: the mean, then the M2 with the spread of the means).
    HAS_RUNNING (BGN, one batch group): the running statistics are updated in place as
    torch's batch norm does, ``r += momentum * (stat - r)`` with the unbiased variance
    ``var * unbias``, computed in float32 and stored in the buffers' dtype."""
    q = tl.program_id(0)
    p = q // G
    g = q % G
    K = E * SPLIT * UPG
    kr = tl.arange(0, BK)
    ref = tl.load(pmean_ptr + (p * E * SPLIT) * U + g * UPG)
    acc = tl.zeros([BK], dtype=tl.float32)
    for k0 in range(0, K, BK):
        k = k0 + kr
        km = k < K
        t = k // UPG
        sp = t % SPLIT
        off = ((p * E + t // SPLIT) * SPLIT + sp) * U + g * UPG + k % UPG
        cnt = tl.minimum(LU - sp * SEG, SEG).to(tl.float32)
        mk = tl.load(pmean_ptr + off, mask=km, other=0.0)
        acc += tl.where(km, cnt * (mk - ref), 0.0)
    mean = ref + tl.sum(acc, axis=0) * inv_count
    acc2 = tl.zeros([BK], dtype=tl.float32)
    for k0 in range(0, K, BK):
        k = k0 + kr
        km = k < K
        t = k // UPG
        sp = t % SPLIT
        off = ((p * E + t // SPLIT) * SPLIT + sp) * U + g * UPG + k % UPG
        cnt = tl.minimum(LU - sp * SEG, SEG).to(tl.float32)
        mk = tl.load(pmean_ptr + off, mask=km, other=0.0)
        m2k = tl.load(pm2_ptr + off, mask=km, other=0.0)
        d = mk - mean
        acc2 += tl.where(km, m2k + cnt * d * d, 0.0)
    var = tl.sum(acc2, axis=0) * inv_count
    tl.store(mean_ptr + q, mean)
    tl.store(var_ptr + q, var)
    tl.store(rstd_ptr + q, 1.0 / tl.sqrt(var + eps))
    if HAS_RUNNING:
        rm = tl.load(rm_ptr + q).to(tl.float32)
        rv = tl.load(rv_ptr + q).to(tl.float32)
        tl.store(rm_ptr + q, (rm + momentum * (mean - rm)).to(rm_ptr.dtype.element_ty))
        tl.store(rv_ptr + q, (rv + momentum * (var * unbias - rv)).to(rv_ptr.dtype.element_ty))


@triton.jit(do_not_specialize=["NS", "U", "CB", "NB", "JB", "G", "UPG", "E"])
def normalize_kernel(
    x_ptr, y_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr,
    C, D, LU, NS, U, CB, NB, JB, G, UPG, E,
    CHANNELS_LAST: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BJ: tl.constexpr, BU: tl.constexpr,
):
    """y = (x - mean_q) * rstd_q * gamma_c + beta_c, one tile per program."""
    pid = tl.program_id(0)
    slot = pid % NB
    t = pid // NB
    jb = t % JB
    n = t // JB
    unit, col_mask, col_off = _columns(slot, C, LU, NS, U, CB, CHANNELS_LAST, BU)
    if CHANNELS_LAST:  # offset between consecutive elements of a unit
        jstride = C
    else:
        jstride = 1
    q = (n // E) * G + unit // UPG
    mean = tl.load(mean_ptr + q, mask=col_mask, other=0.0)
    scale = tl.load(rstd_ptr + q, mask=col_mask, other=0.0)
    if HAS_W:
        scale = scale * tl.load(w_ptr + unit // NS, mask=col_mask, other=0.0).to(tl.float32)
    if HAS_B:
        shift = tl.load(b_ptr + unit // NS, mask=col_mask, other=0.0).to(tl.float32)
    else:
        shift = tl.zeros([BU], dtype=tl.float32)
    j = jb * BJ + tl.arange(0, BJ)
    m = (j < LU)[:, None] & col_mask[None, :]
    offs = col_off[None, :] + j[:, None] * jstride
    base = n.to(tl.int64) * D
    x = tl.load(x_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
    y = (x - mean[None, :]) * scale[None, :] + shift[None, :]
    tl.store(y_ptr + base + offs, y.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["NS", "U", "CB", "NB", "SPLIT", "SEG", "N_ITER", "G", "UPG", "E"])
def backward_partials_kernel(
    dy_ptr, x_ptr, mean_ptr, ps1_ptr, ps2_ptr,
    C, D, LU, NS, U, CB, NB, SPLIT, SEG, N_ITER, G, UPG, E,
    CHANNELS_LAST: tl.constexpr, BJ: tl.constexpr, BU: tl.constexpr,
):
    """Per (example, segment, unit): sum(dy) and sum(dy * (x - mean_q)), centred with the
    saved group mean (exact for inputs like 1e4 + N(0, 1))."""
    pid = tl.program_id(0)
    slot = pid % NB
    t = pid // NB
    sp = t % SPLIT
    n = t // SPLIT
    unit, col_mask, col_off = _columns(slot, C, LU, NS, U, CB, CHANNELS_LAST, BU)
    if CHANNELS_LAST:  # offset between consecutive elements of a unit
        jstride = C
    else:
        jstride = 1
    mean = tl.load(mean_ptr + (n // E) * G + unit // UPG, mask=col_mask, other=0.0)
    base = n.to(tl.int64) * D
    jr = tl.arange(0, BJ)
    s1 = tl.zeros([BJ, BU], dtype=tl.float32)
    s2 = tl.zeros([BJ, BU], dtype=tl.float32)
    j0 = sp * SEG
    for it in range(0, N_ITER):
        j = j0 + it * BJ + jr
        m = (j < LU)[:, None] & col_mask[None, :]
        offs = col_off[None, :] + j[:, None] * jstride
        dy = tl.load(dy_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
        s1 += dy
        s2 += tl.where(m, dy * (x - mean[None, :]), 0.0)
    out = (n * SPLIT + sp) * U + unit
    tl.store(ps1_ptr + out, tl.sum(s1, axis=0), mask=col_mask)
    tl.store(ps2_ptr + out, tl.sum(s2, axis=0), mask=col_mask)


@triton.jit
def _channel_sums(
    c, ps1_ptr, ps2_ptr, rstd_ptr, dw_ptr, db_ptr, N, U, NS, SPLIT, G, UPG, E,
    BK: tl.constexpr,
):
    """Channel c: db_c = sum(dy), dw_c = sum(rstd_q * sum(dy * (x - mean_q))) over the
    examples, segments and the NS units of c."""
    K = N * SPLIT * NS
    kr = tl.arange(0, BK)
    a1 = tl.zeros([BK], dtype=tl.float32)
    a2 = tl.zeros([BK], dtype=tl.float32)
    for k0 in range(0, K, BK):
        k = k0 + kr
        km = k < K
        t = k // NS
        unit = c * NS + k % NS
        off = t * U + unit
        rstd = tl.load(rstd_ptr + ((t // SPLIT) // E) * G + unit // UPG, mask=km, other=0.0)
        a1 += tl.load(ps1_ptr + off, mask=km, other=0.0)
        a2 += rstd * tl.load(ps2_ptr + off, mask=km, other=0.0)
    tl.store(db_ptr + c, tl.sum(a1, axis=0))
    tl.store(dw_ptr + c, tl.sum(a2, axis=0))


@triton.jit
def _group_sums(
    q, ps1_ptr, ps2_ptr, rstd_ptr, w_ptr, m1_ptr, m2_ptr, G, U, UPG, NS, E, SPLIT, inv_count,
    HAS_W: tl.constexpr, BK: tl.constexpr,
):
    """Statistic q = (p, g): m1_q = mean_q(gamma_c dy) and m2_q = mean_q(gamma_c dy xhat)
    from the partials of its units."""
    p = q // G
    g = q % G
    K = E * SPLIT * UPG
    kr = tl.arange(0, BK)
    a1 = tl.zeros([BK], dtype=tl.float32)
    a2 = tl.zeros([BK], dtype=tl.float32)
    for k0 in range(0, K, BK):
        k = k0 + kr
        km = k < K
        unit = g * UPG + k % UPG
        off = (p * E * SPLIT + k // UPG) * U + unit
        s1 = tl.load(ps1_ptr + off, mask=km, other=0.0)
        s2 = tl.load(ps2_ptr + off, mask=km, other=0.0)
        if HAS_W:
            w = tl.load(w_ptr + unit // NS, mask=km, other=0.0).to(tl.float32)
            s1 = s1 * w
            s2 = s2 * w
        a1 += s1
        a2 += s2
    rstd = tl.load(rstd_ptr + q)
    tl.store(m1_ptr + q, tl.sum(a1, axis=0) * inv_count)
    tl.store(m2_ptr + q, tl.sum(a2, axis=0) * inv_count * rstd)


@triton.jit(do_not_specialize=["N", "U", "NS", "SPLIT", "G", "UPG", "E", "C"])
def backward_merge_kernel(
    ps1_ptr, ps2_ptr, rstd_ptr, w_ptr, dw_ptr, db_ptr, m1_ptr, m2_ptr,
    N, U, NS, SPLIT, G, UPG, E, C, inv_count,
    HAS_W: tl.constexpr, BK: tl.constexpr,
):
    """The backward's merges in one launch: programs 0..C-1 reduce the partials of a channel
    (dgamma, dbeta), programs C..C+P0*G-1 those of a statistic (m1, m2; launched only when
    dx is needed). Each program loops over its partials in blocks of BK."""
    pid = tl.program_id(0)
    if pid < C:
        _channel_sums(pid, ps1_ptr, ps2_ptr, rstd_ptr, dw_ptr, db_ptr, N, U, NS, SPLIT, G,
                      UPG, E, BK)
    else:
        _group_sums(pid - C, ps1_ptr, ps2_ptr, rstd_ptr, w_ptr, m1_ptr, m2_ptr, G, U, UPG, NS,
                    E, SPLIT, inv_count, HAS_W, BK)


@triton.jit(do_not_specialize=["NS", "U", "CB", "NB", "JB", "G", "UPG", "E"])
def backward_dx_kernel(
    dy_ptr, x_ptr, dx_ptr, mean_ptr, rstd_ptr, w_ptr, m1_ptr, m2_ptr,
    C, D, LU, NS, U, CB, NB, JB, G, UPG, E,
    CHANNELS_LAST: tl.constexpr, HAS_W: tl.constexpr, BJ: tl.constexpr, BU: tl.constexpr,
):
    """dx = rstd_q * (gamma_c dy - m1_q - xhat * m2_q), xhat = (x - mean_q) * rstd_q."""
    pid = tl.program_id(0)
    slot = pid % NB
    t = pid // NB
    jb = t % JB
    n = t // JB
    unit, col_mask, col_off = _columns(slot, C, LU, NS, U, CB, CHANNELS_LAST, BU)
    if CHANNELS_LAST:  # offset between consecutive elements of a unit
        jstride = C
    else:
        jstride = 1
    q = (n // E) * G + unit // UPG
    mean = tl.load(mean_ptr + q, mask=col_mask, other=0.0)
    rstd = tl.load(rstd_ptr + q, mask=col_mask, other=0.0)
    m1 = tl.load(m1_ptr + q, mask=col_mask, other=0.0)
    m2 = tl.load(m2_ptr + q, mask=col_mask, other=0.0)
    if HAS_W:
        w = tl.load(w_ptr + unit // NS, mask=col_mask, other=0.0).to(tl.float32)
    else:
        w = tl.full([BU], 1.0, dtype=tl.float32)
    j = jb * BJ + tl.arange(0, BJ)
    m = (j < LU)[:, None] & col_mask[None, :]
    offs = col_off[None, :] + j[:, None] * jstride
    base = n.to(tl.int64) * D
    dy = tl.load(dy_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
    xhat = (x - mean[None, :]) * rstd[None, :]
    dx = rstd[None, :] * (w[None, :] * dy - m1[None, :] - xhat * m2[None, :])
    tl.store(dx_ptr + base + offs, dx.to(dx_ptr.dtype.element_ty), mask=m)
