// The tab's DOM nodes, filled in once by buildUI() (views/tab.js) and read by the views.

export const ui = {}
