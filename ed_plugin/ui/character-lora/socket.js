// The daemon's WebSocket (/ws): reconnects by itself with a growing back-off, and re-dispatches every frame,
// both as a "frame" event and as an event named after the frame's type (as ComfyUI's web/scripts/api.js does),
// so a view can listen to just the events it shows. Also emits "open" and "close" ({wasConnected}).

const OWN_EVENTS = ["open", "close", "frame"]

export class DaemonSocket extends EventTarget {
    /** target() -> {url, token} of the daemon, read at each (re)connect */
    constructor(target) {
        super()
        this.target = target
        this.ws = null
        this.wanted = false
        this.backoff = 1000
        this.reconnectTimer = null
        this.connected = false
    }

    open() {
        this.wanted = true
        const { url, token } = this.target()
        if (this.ws || !url || !token) return
        const wsUrl = url.replace(/^http/, "ws") + "/ws?token=" + encodeURIComponent(token)
        let ws
        try {
            ws = new WebSocket(wsUrl)
        } catch (e) {
            this.scheduleReconnect()
            return
        }
        this.ws = ws
        ws.addEventListener("open", () => {
            this.backoff = 1000
            this.connected = true
            this.dispatchEvent(new CustomEvent("open"))
        })
        ws.addEventListener("message", (ev) => {
            let frame
            try {
                frame = JSON.parse(ev.data)
            } catch (e) {
                return
            }
            if (!frame || typeof frame !== "object") return
            this.dispatchEvent(new CustomEvent("frame", { detail: frame }))
            if (typeof frame.type === "string" && !OWN_EVENTS.includes(frame.type)) {
                this.dispatchEvent(new CustomEvent(frame.type, { detail: frame }))
            }
        })
        ws.addEventListener("close", () => {
            const wasConnected = this.connected
            this.connected = false
            if (this.ws === ws) this.ws = null
            this.dispatchEvent(new CustomEvent("close", { detail: { wasConnected } }))
            if (this.wanted) this.scheduleReconnect()
        })
        ws.addEventListener("error", () => {
            /* "close" follows and reconnects */
        })
    }

    scheduleReconnect() {
        if (this.reconnectTimer) return
        const delay = this.backoff + Math.floor(Math.random() * 300)
        this.backoff = Math.min(this.backoff * 2, 15000)
        this.reconnectTimer = setTimeout(() => {
            this.reconnectTimer = null
            if (this.wanted) this.open()
        }, delay)
    }

    close() {
        const ws = this.ws
        this.ws = null
        this.connected = false
        if (ws) {
            try {
                ws.close()
            } catch (e) {
                /* already closed */
            }
        }
    }

    reconnectNow() {
        if (this.reconnectTimer) {
            clearTimeout(this.reconnectTimer)
            this.reconnectTimer = null
        }
        this.backoff = 1000
        this.close()
        this.open()
    }
}
