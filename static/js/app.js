/* Small helpers on top of htmx. No third-party code here; htmx itself comes from static/vendor/. */
(function () {
  "use strict";

  // Live filters send every field of the form; drop the empty ones so the pushed URL stays readable.
  document.addEventListener("htmx:configRequest", function (event) {
    if (event.detail.verb !== "get" || !event.detail.formData) return;
    const formData = event.detail.formData;
    for (const [name, value] of Array.from(formData.entries())) {
      if (value === "") formData.delete(name);
    }
  });

  // htmx keeps a snapshot of the page's HTML for the back button. What the user typed or picked lives in
  // properties, not in the HTML, so copy it into attributes first: going back then shows the search box
  // and filters that produced the list, and the next filter change keeps them.
  document.addEventListener("htmx:beforeHistorySave", function () {
    document.querySelectorAll("form input, form select, form textarea").forEach(function (field) {
      if (field.type === "password" || field.type === "file" || field.type === "hidden") return;
      if (field.type === "checkbox" || field.type === "radio") {
        field.toggleAttribute("checked", field.checked);
      } else if (field.tagName === "SELECT") {
        Array.from(field.options).forEach(function (option) { option.toggleAttribute("selected", option.selected); });
      } else if (field.tagName === "TEXTAREA") {
        field.textContent = field.value;
      } else {
        field.setAttribute("value", field.value);
      }
    });
  });

  // Copy buttons (data-copy-target="<element id>"): the shown-once secret, key or certificate, and the snippets.
  document.addEventListener("click", function (event) {
    const button = event.target.closest("[data-copy-target]");
    if (!button) return;
    const source = document.getElementById(button.dataset.copyTarget);
    if (!source || !navigator.clipboard) return;
    navigator.clipboard.writeText(source.textContent).then(function () { button.textContent = "Copied"; });
  });

  // Buttons that ask before they act (data-confirm="..."), for plain forms without htmx.
  document.addEventListener("submit", function (event) {
    const message = event.submitter && event.submitter.dataset.confirm;
    if (message && !window.confirm(message)) event.preventDefault();
  });
})();
