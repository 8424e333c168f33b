// Small DOM helpers shared by the Z-Image Turbo node widgets (no extension is registered here).
// ComfyUI loads every .js file of WEB_DIRECTORY as a module; this one only exports helpers.

/** Create an element: el("button.zimage-x", {title: "..", onclick: fn, dataset: {a: 1}}, ...children). */
export function el(spec, props = {}, ...children) {
    const [tag, ...classes] = spec.split(".");
    const node = document.createElement(tag || "div");
    if (classes.length) node.className = classes.join(" ");
    for (const [key, value] of Object.entries(props)) {
        if (value === undefined || value === null) continue;
        if (key === "dataset") Object.assign(node.dataset, value);
        else if (key === "style") Object.assign(node.style, value);
        else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
        else if (key in node) node[key] = value;
        else node.setAttribute(key, value);
    }
    for (const child of children.flat()) {
        if (child === undefined || child === null || child === false) continue;
        node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
}

/** Add a <style> element once per id (both node kinds share the page). */
export function addStyle(id, css) {
    if (document.getElementById(id)) return;
    document.head.append(el("style", { id }, css));
}

/**
 * Let the middle button and ctrl+wheel reach the canvas from inside a widget, so panning and
 * zooming still work when the pointer is over our rows (as they do over ComfyUI's own text boxes).
 */
export function passCanvasGestures(element, canvas) {
    element.addEventListener("pointerdown", (e) => { if (e.button === 1) canvas.processMouseDown(e); });
    element.addEventListener("pointermove", (e) => { if ((e.buttons & 4) === 4) canvas.processMouseMove(e); });
    element.addEventListener("pointerup", (e) => { if (e.button === 1) canvas.processMouseUp(e); });
    element.addEventListener("wheel", (e) => {
        if (e.target instanceof HTMLSelectElement || e.target instanceof HTMLInputElement) return;
        e.preventDefault();
        canvas.processMouseWheel(e);
    }, { passive: false });
}

/**
 * Hide a widget in every node rendering while it keeps its value, its place in widgets_values and
 * its part in the prompt. The front ends read two flags: the classic canvas `widget.hidden`, the
 * "Nodes 2.0" (Vue) nodes and the properties panel `widget.options.hidden` (front ends up to 1.4x
 * read only that one there; later ones treat the two as one flag). Set both.
 */
export function hideWidget(widget) {
    widget.hidden = true;
    widget.options ??= {};
    widget.options.hidden = true;
    // The classic canvas of older front ends still gives a hidden DOM widget its minimum height: ask for none.
    widget.computeLayoutSize = () => ({ minHeight: 0, maxHeight: 0, minWidth: 0 });
}

export const GIB = 1024 ** 3;

export function formatBytes(bytes) {
    if (!Number.isFinite(bytes)) return "?";
    if (bytes >= GIB) return `${(bytes / GIB).toFixed(2)} GiB`;
    return `${(bytes / 1024 ** 2).toFixed(0)} MiB`;
}

export function formatMs(seconds) {
    if (!Number.isFinite(seconds)) return "–";
    const ms = seconds * 1000;
    return ms >= 10000 ? `${(ms / 1000).toFixed(2)} s` : `${ms.toFixed(1)} ms`;
}
