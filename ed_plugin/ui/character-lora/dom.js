import { ed } from "./ed.js"

/** el("div", {className, text, attrs, on, style}, child, ...): text always goes in as text nodes. */
export function el(tag, props, ...children) {
    const node = document.createElement(tag)
    props = props || {}
    if (props.className) node.className = props.className
    if (props.text !== undefined && props.text !== null) node.textContent = String(props.text)
    if (props.attrs) {
        for (const [k, v] of Object.entries(props.attrs)) {
            if (v !== undefined && v !== null && v !== false) node.setAttribute(k, v === true ? "" : String(v))
        }
    }
    if (props.on) {
        for (const [k, v] of Object.entries(props.on)) node.addEventListener(k, v)
    }
    if (props.style) Object.assign(node.style, props.style)
    for (const child of children.flat()) {
        if (child === null || child === undefined || child === false) continue
        node.appendChild(child instanceof Node ? child : document.createTextNode(String(child)))
    }
    return node
}

export function icon(name) {
    return el("i", { className: "fa-solid " + name, attrs: { "aria-hidden": "true" } })
}

export function escapeHtml(text) {
    return String(text).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c])
}

export function toast(message, error) {
    const fn = ed.showToast()
    if (fn) fn(escapeHtml(message), error ? 8000 : 5000, !!error)
    else console[error ? "error" : "log"]("[Character LoRA]", message)
}
