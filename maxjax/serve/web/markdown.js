// A small Markdown renderer for model answers, safe by construction: the text is HTML-escaped before any tag is
// added, and the only tags in the output are the ones written here. Code fences, inline code, headings, lists,
// block quotes, rules, bold / italic / strikethrough and http(s) / mailto links; anything else stays text.
"use strict";

(() => {
  const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

  function escapeHtml(text) {
    return String(text).replace(/[&<>"']/g, (c) => ESCAPES[c]);
  }

  // Inline spans of one block of raw text. Code spans and links are set aside as numbered slots (their content
  // must not be read as emphasis), the rest is escaped, emphasis is applied, then the slots come back.
  function inline(raw) {
    const slots = [];
    const keep = (html) => "\u0000" + (slots.push(html) - 1) + "\u0000";
    let s = String(raw).replace(/\u0000/g, "");
    s = s.replace(/`([^`\n]+)`/g, (_, code) => keep("<code>" + escapeHtml(code) + "</code>"));
    s = escapeHtml(s);
    s = s.replace(/\[([^\]\n]+)\]\(([^()\s]+)\)/g, (whole, label, url) =>
      /^(https?:\/\/|mailto:)/i.test(url) ? keep(link(url, label)) : whole);
    s = s.replace(/https?:\/\/(?:[^\s&\u0000]|&amp;)+/g, (url) => {
      const tail = /[.,;:!?)\]]+$/.exec(url);
      const bare = tail ? url.slice(0, -tail[0].length) : url;
      return keep(link(bare, bare)) + (tail ? tail[0] : "");
    });
    s = s.replace(/\*\*(?=\S)([^\n]*?\S)\*\*/g, "<strong>$1</strong>");
    s = s.replace(/(^|[^\w])__(?=\S)([^\n]*?\S)__(?!\w)/g, "$1<strong>$2</strong>");
    s = s.replace(/(^|[^*\w])\*(?=[^\s*])([^*\n]*[^\s*]|[^\s*])\*(?![*\w])/g, "$1<em>$2</em>");
    s = s.replace(/(^|[^\w])_(?=[^\s_])([^_\n]*[^\s_]|[^\s_])_(?!\w)/g, "$1<em>$2</em>");
    s = s.replace(/~~(?=\S)([^\n]*?\S)~~/g, "<del>$1</del>");
    return s.replace(/\u0000(\d+)\u0000/g, (_, i) => slots[Number(i)]);
  }

  function link(url, label) {
    return `<a href="${url}" target="_blank" rel="noopener noreferrer">${label}</a>`;
  }

  function codeBlock(code, lang) {
    const name = lang ? escapeHtml(lang) : "code";
    return `<div class="code-block"><div class="code-head"><span class="code-lang">${name}</span>` +
      `<button type="button" class="copy">Copy</button></div><pre><code>${escapeHtml(code)}</code></pre></div>`;
  }

  const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([\w+#.-]*)/;
  const HEADING = /^ {0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$/;
  const RULE = /^ {0,3}([-*_])(?:\s*\1){2,}\s*$/;
  const QUOTE = /^ {0,3}>\s?(.*)$/;
  const BULLET = /^(\s*)[-*+]\s+(.*)$/;
  const NUMBERED = /^(\s*)(\d{1,9})[.)]\s+(.*)$/;

  // The blocks of a whole answer. An unclosed fence (an answer still streaming) runs to the end as code.
  function render(source) {
    const lines = String(source).replace(/\r\n?/g, "\n").split("\n");
    const out = [];
    let para = [];
    let list = null; // {tag, start, items: [{depth, lines}]}

    const flushPara = () => {
      if (para.length) out.push("<p>" + para.map(inline).join("<br>") + "</p>");
      para = [];
    };
    const flushList = () => {
      if (!list) return;
      const start = list.tag === "ol" && list.start !== 1 ? ` start="${list.start}"` : "";
      const items = list.items.map((item) =>
        `<li${item.depth ? ` class="depth-${item.depth}"` : ""}>${item.lines.map(inline).join("<br>")}</li>`);
      out.push(`<${list.tag}${start}>${items.join("")}</${list.tag}>`);
      list = null;
    };
    const flush = () => { flushPara(); flushList(); };

    for (let i = 0; i < lines.length; i++) {
      const line = lines[i];
      let m;
      if ((m = FENCE.exec(line))) {
        flush();
        const close = new RegExp(`^ {0,3}${m[1][0] === "`" ? "`" : "~"}{${m[1].length},}\\s*$`);
        const body = [];
        for (i++; i < lines.length && !close.test(lines[i]); i++) body.push(lines[i]);
        out.push(codeBlock(body.join("\n"), m[2]));
      } else if (/^\s*$/.test(line)) {
        flush();
      } else if ((m = HEADING.exec(line))) {
        flush();
        out.push(`<h${m[1].length}>${inline(m[2])}</h${m[1].length}>`);
      } else if (RULE.test(line)) {
        flush();
        out.push("<hr>");
      } else if ((m = QUOTE.exec(line))) {
        flush();
        const quoted = [m[1]];
        while (i + 1 < lines.length && (m = QUOTE.exec(lines[i + 1]))) { quoted.push(m[1]); i++; }
        out.push("<blockquote>" + render(quoted.join("\n")) + "</blockquote>");
      } else if ((m = BULLET.exec(line) || NUMBERED.exec(line))) {
        flushPara();
        const ordered = m.length === 4;
        const tag = ordered ? "ol" : "ul";
        if (!list || list.tag !== tag) {
          flushList();
          list = { tag, start: ordered ? Number(m[2]) : 1, items: [] };
        }
        const depth = Math.min(3, Math.floor(m[1].replace(/\t/g, "  ").length / 2));
        list.items.push({ depth, lines: [m[m.length - 1]] });
      } else if (list && /^\s+\S/.test(line)) {
        list.items[list.items.length - 1].lines.push(line.trim()); // an item's continued line
      } else {
        flushList();
        para.push(line);
      }
    }
    flush();
    return out.join("\n");
  }

  window.maxjaxMarkdown = { render, escapeHtml };
})();
