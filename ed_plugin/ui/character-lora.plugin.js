/*
    Character LoRA One-Click: the "Train character LoRA" tab for Easy Diffusion (the loader).

    Installed by install_plugin.py into <ED root>/plugins/ui/. ED runs this classic script; it imports the tab's
    ES modules (ed_plugin/ui/character-lora/*.js, installed into <ED root>/plugins/ui/character-lora/) from the
    route /character-lora/ui/ that the companion server plugin adds to ED's server. No build step.
    When that import fails (most often: ED was not restarted after the install, so the server plugin is not
    loaded), the tab still appears and says so in one sentence.

    The only global this file defines is window.CharacterLoRA (version, state, and a few hooks, filled in by
    main.js).
*/
;(function () {
    "use strict"

    if (window.CharacterLoRA && window.CharacterLoRA.loaded) {
        return // loaded twice (e.g. a plugin manager copy and the file): keep the first
    }
    const ENTRY = "/character-lora/ui/main.js"
    const TAB_ID = "character-lora"
    const LOAD_FAILED =
        "The Train character LoRA tab could not load its code from Easy Diffusion's server " +
        "(" + ENTRY + "): restart Easy Diffusion so that it loads the Character LoRA server plugin, then reload this page."
    const loader = { loaded: true, version: "0.1.0", modules: "loading", loadError: null }
    window.CharacterLoRA = loader

    function showLoadFailure() {
        let make
        try {
            make = typeof createTab === "function" ? createTab : undefined
        } catch (e) {
            make = undefined
        }
        if (!make || !document.getElementById("tab-container") || !document.getElementById("tab-content-wrapper")) return false
        if (document.getElementById("tab-" + TAB_ID)) return true
        const note = document.createElement("p")
        note.setAttribute("data-clora", "load-error")
        note.setAttribute("role", "alert")
        note.textContent = LOAD_FAILED
        make({ id: TAB_ID, icon: "fa-user-gear", label: "Train character LoRA", content: note })
        return true
    }

    import(ENTRY).then(
        () => {
            loader.modules = "ready"
        },
        (err) => {
            loader.modules = "failed"
            loader.loadError = String((err && err.message) || err)
            console.error("[Character LoRA]", LOAD_FAILED, err)
            if (!showLoadFailure()) {
                let tries = 0
                const timer = setInterval(() => {
                    tries += 1
                    if (showLoadFailure() || tries > 600) clearInterval(timer)
                }, 100)
            }
        }
    )
})()
