// The loss series of a job, as pure functions: points are [step, epoch, loss] (the daemon's GET /jobs/{id}/loss
// and `loss` frames), kept sorted by step with one point per step.

/** `points` with `incoming` merged in by step (an incoming point replaces the one at its step), sorted. */
export function mergePoints(points, incoming) {
    if (!incoming || !incoming.length) return points
    const last = points.length ? points[points.length - 1][0] : -Infinity
    const valid = incoming.filter(isPoint)
    // the common case, a live frame after everything we have: append
    if (valid.length && valid[0][0] > last && isSorted(valid)) return points.concat(valid)
    const byStep = new Map(points.map((p) => [p[0], p]))
    for (const p of valid) byStep.set(p[0], p)
    return Array.from(byStep.values()).sort((a, b) => a[0] - b[0])
}
function isPoint(p) {
    return Array.isArray(p) && p.length >= 3 && Number.isFinite(p[0]) && Number.isFinite(p[1]) && Number.isFinite(p[2])
}
function isSorted(points) {
    for (let i = 1; i < points.length; i++) if (points[i][0] <= points[i - 1][0]) return false
    return true
}
/** What a launch that trains again from after `epoch` leaves (0: nothing). */
export function dropAfterEpoch(points, epoch) {
    return points.filter((p) => p[1] <= epoch)
}
/** Exponential moving average of the losses, debiased at the start (as TensorBoard's smoothing): `weight` 0 is
 * the raw series, near 1 very smooth. One value per point. */
export function ema(points, weight = 0.9) {
    const out = []
    let acc = 0
    let n = 0
    for (const p of points) {
        acc = acc * weight + (1 - weight) * p[2]
        n += 1
        out.push(weight > 0 ? acc / (1 - Math.pow(weight, n)) : p[2])
    }
    return out
}
/** A smoothing weight that suits the number of points: a short run stays readable, a long one gets calm. */
export function smoothingFor(count) {
    if (count < 20) return 0.6
    if (count < 200) return 0.85
    return 0.95
}
/** [{epoch, step}]: the last step of each epoch that is followed by another epoch (where a mark is drawn). */
export function epochMarks(points) {
    const marks = []
    for (let i = 1; i < points.length; i++) {
        if (points[i][1] !== points[i - 1][1]) marks.push({ epoch: points[i - 1][1], step: points[i - 1][0] })
    }
    return marks
}
/** The mean loss of one epoch's points, or null. */
export function epochMean(points, epoch) {
    let sum = 0
    let n = 0
    for (const p of points) {
        if (p[1] === epoch) {
            sum += p[2]
            n += 1
        }
    }
    return n ? sum / n : null
}
/** The axis ranges: steps from 0 to the job's total (or the last step), losses padded by 5%. */
export function extent(points, total) {
    let lo = Infinity
    let hi = -Infinity
    for (const p of points) {
        if (p[2] < lo) lo = p[2]
        if (p[2] > hi) hi = p[2]
    }
    if (!points.length) {
        lo = 0
        hi = 1
    } else if (hi - lo < 1e-9) {
        lo -= 0.5 * Math.abs(lo || 1) * 0.1
        hi += 0.5 * Math.abs(hi || 1) * 0.1
    }
    const pad = (hi - lo) * 0.05
    const last = points.length ? points[points.length - 1][0] : 1
    return { x0: 0, x1: Math.max(total || 0, last, 1), y0: lo - pad, y1: hi + pad }
}
/** About `count` round tick values between lo and hi. */
export function ticks(lo, hi, count = 4) {
    if (!(hi > lo)) return [lo]
    const raw = (hi - lo) / count
    const mag = Math.pow(10, Math.floor(Math.log10(raw)))
    const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw) || raw
    const out = []
    for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(Number(v.toPrecision(12)))
    return out
}
