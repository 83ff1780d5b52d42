// The loss chart of the job in the panel: every step's loss (dots), its moving average (line), a mark at the end of
// each epoch, axis labels. A plain canvas, redrawn when the series or the width changes.
import { el, icon } from "../dom.js"
import { ema, epochMarks, extent, smoothingFor, ticks } from "../loss-series.js"

const HEIGHT = 170
const PAD = { left: 46, right: 10, top: 10, bottom: 26 }

export function makeLossChart() {
    const canvas = el("canvas", { attrs: { "data-clora": "loss-canvas", role: "img", "aria-label": "Loss per step" } })
    const note = el("span", { className: "clora-small", attrs: { "data-clora": "loss-note" } })
    const box = el(
        "div",
        { className: "clora-loss", attrs: { "data-clora": "loss-chart", hidden: true } },
        el("div", { className: "clora-loss-head" }, icon("fa-chart-line"), " Loss ", note),
        canvas
    )
    return { box, canvas, note, key: null }
}
/** Bring the chart up to date with `series` ({points, total, epochs}); cheap when nothing changed. */
export function updateLossChart(chart, series) {
    const points = (series && series.points) || []
    chart.box.hidden = !points.length
    if (!points.length) {
        chart.key = null
        return
    }
    const width = Math.round(chart.box.clientWidth || 0)
    if (!width) return // not laid out (tab hidden): drawn when it is shown
    const last = points[points.length - 1]
    const key = [points.length, last[0], last[2], points[0][0], series.total, width].join("|")
    if (key === chart.key) return
    chart.key = key
    draw(chart, points, series.total, width)
}
function cssColor(node, name, fallback) {
    const v = getComputedStyle(node).getPropertyValue(name).trim()
    return v || fallback
}
function draw(chart, points, total, width) {
    const { canvas, box } = chart
    const dpr = window.devicePixelRatio || 1
    canvas.width = Math.round(width * dpr)
    canvas.height = Math.round(HEIGHT * dpr)
    canvas.style.width = width + "px"
    canvas.style.height = HEIGHT + "px"
    const ctx = canvas.getContext("2d")
    if (!ctx) return
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0)
    ctx.clearRect(0, 0, width, HEIGHT)
    const text = cssColor(box, "--text-color", "#ddd")
    const muted = cssColor(box, "--small-label-color", "#999")
    const grid = cssColor(box, "--background-color3", "rgba(128,128,128,0.25)")
    const accent = cssColor(box, "--accent-color", "#6f6cd9")
    const { x0, x1, y0, y1 } = extent(points, total)
    const w = width - PAD.left - PAD.right
    const h = HEIGHT - PAD.top - PAD.bottom
    const X = (s) => PAD.left + ((s - x0) / (x1 - x0)) * w
    const Y = (v) => PAD.top + (1 - (v - y0) / (y1 - y0)) * h
    ctx.font = "10px sans-serif"
    ctx.lineWidth = 1
    // horizontal grid and loss labels
    ctx.fillStyle = muted
    ctx.textAlign = "right"
    ctx.textBaseline = "middle"
    for (const v of ticks(y0, y1, 4)) {
        ctx.strokeStyle = grid
        ctx.beginPath()
        ctx.moveTo(PAD.left, Y(v) + 0.5)
        ctx.lineTo(PAD.left + w, Y(v) + 0.5)
        ctx.stroke()
        ctx.fillText(v.toPrecision(3), PAD.left - 4, Y(v))
    }
    // step labels
    ctx.textAlign = "center"
    ctx.textBaseline = "top"
    for (const s of ticks(x0, x1, Math.max(2, Math.floor(w / 90)))) ctx.fillText(String(Math.round(s)), X(s), PAD.top + h + 4)
    ctx.textAlign = "right"
    ctx.fillText("step", PAD.left + w, PAD.top + h + 14)
    // epoch marks: dashed verticals at each epoch's last step
    const marks = epochMarks(points)
    ctx.setLineDash([3, 3])
    ctx.strokeStyle = muted
    ctx.textAlign = "left"
    ctx.textBaseline = "top"
    for (const m of marks) {
        const x = Math.round(X(m.step)) + 0.5
        ctx.beginPath()
        ctx.moveTo(x, PAD.top)
        ctx.lineTo(x, PAD.top + h)
        ctx.stroke()
        ctx.fillText("e" + m.epoch, x + 2, PAD.top)
    }
    ctx.setLineDash([])
    // raw points
    ctx.fillStyle = text
    ctx.globalAlpha = 0.35
    const r = points.length > 400 ? 1 : 1.5
    for (const p of points) {
        ctx.beginPath()
        ctx.arc(X(p[0]), Y(p[2]), r, 0, 2 * Math.PI)
        ctx.fill()
    }
    ctx.globalAlpha = 1
    // the smoothed line; a gap in the steps (an attempt that ran out of memory) is not bridged
    const smooth = ema(points, smoothingFor(points.length))
    ctx.strokeStyle = accent
    ctx.lineWidth = 2
    ctx.beginPath()
    points.forEach((p, i) => {
        const gap = i > 0 && p[0] - points[i - 1][0] > 1
        if (i === 0 || gap) ctx.moveTo(X(p[0]), Y(smooth[i]))
        else ctx.lineTo(X(p[0]), Y(smooth[i]))
    })
    ctx.stroke()
    const lastSmooth = smooth[smooth.length - 1]
    chart.note.textContent = "· " + points.length + " steps · smoothed " + lastSmooth.toFixed(4) + (marks.length ? " · dashed lines end each epoch" : "")
    canvas.dataset.points = String(points.length)
    canvas.dataset.marks = String(marks.length)
    canvas.dataset.lastStep = String(points[points.length - 1][0])
    canvas.setAttribute("aria-label", "Loss per step: " + points.length + " steps, smoothed loss now " + lastSmooth.toFixed(4))
}
