// The demo: a todo list on the browser client. Its token comes from the hub's
// development endpoint /dev/token (only there while the hub runs without a
// configured secret); the user is the ?user= parameter (default "demo"); the
// device id is made once per browser and kept in localStorage.
import { HubClient } from "/client/hub.js";

const COLLECTION = "todos";
const $ = (id) => document.getElementById(id);

const params = new URLSearchParams(location.search);
const user = params.get("user") || "demo";
let device = localStorage.getItem("hub-demo-device");
if (!device) {
  const bytes = crypto.getRandomValues(new Uint8Array(4));
  device = "web-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  localStorage.setItem("hub-demo-device", device);
}

async function token() {
  const res = await fetch(`/dev/token?user=${encodeURIComponent(user)}`);
  if (!res.ok) {
    throw new Error(res.status === 404 ? "this hub hands out no development tokens" : `token: HTTP ${res.status}`);
  }
  return (await res.json()).token;
}

const hub = new HubClient({
  device,
  token,
  dbName: `hub-demo:${user}:${device}`,
  deviceName: `${navigator.userAgent.includes("Headless") ? "headless " : ""}browser`,
  platform: "web",
});
window.hub = hub; // for the console (and the browser tests)

function newId() {
  const bytes = crypto.getRandomValues(new Uint8Array(8));
  return "t-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function showStatus(status) {
  const state = $("state");
  state.textContent = status.state;
  state.dataset.state = status.state;
  const pending = $("pending");
  pending.textContent = `${status.pending} pending`;
  pending.dataset.pending = String(status.pending);
  $("role").textContent = status.leader ? "this tab syncs" : "another tab syncs";
  document.body.dataset.state = status.state;
  document.body.dataset.pending = String(status.pending);
  if (status.state === "online") $("error").textContent = "";
}

let rendering = Promise.resolve();
function render() {
  rendering = rendering.then(renderNow, renderNow);
  return rendering;
}

async function renderNow() {
  const todos = await hub.list(COLLECTION);
  todos.sort(
    (a, b) => (a.fields.created ?? 0) - (b.fields.created ?? 0) || (a.id < b.id ? -1 : a.id > b.id ? 1 : 0),
  );
  const list = $("todos");
  list.replaceChildren(
    ...todos.map((todo) => {
      const li = document.createElement("li");
      li.dataset.id = todo.id;
      li.classList.toggle("done", Boolean(todo.fields.done));
      const box = document.createElement("input");
      box.type = "checkbox";
      box.checked = Boolean(todo.fields.done);
      box.setAttribute("aria-label", "done");
      box.addEventListener("change", () => act(hub.upsert(COLLECTION, todo.id, { done: box.checked })));
      const title = document.createElement("span");
      title.className = "title";
      title.textContent = String(todo.fields.title ?? "");
      const del = document.createElement("button");
      del.className = "delete";
      del.title = "delete";
      del.setAttribute("aria-label", "delete");
      del.textContent = "✕";
      del.addEventListener("click", () => act(hub.delete(COLLECTION, todo.id)));
      li.append(box, title, del);
      return li;
    }),
  );
  $("empty").hidden = todos.length > 0;
  const left = todos.filter((t) => !t.fields.done).length;
  $("left").textContent = todos.length ? `${left} of ${todos.length} left` : "";
  document.body.dataset.count = String(todos.length);
}

function act(promise) {
  promise.catch((err) => {
    $("error").textContent = err.message || String(err);
  });
}

$("user").value = user;
$("device").textContent = `device ${device}`;
$("who").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const name = $("user").value.trim() || "demo";
  location.search = `?user=${encodeURIComponent(name)}`;
});
$("add").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const title = $("title").value.trim();
  if (!title) return;
  $("title").value = "";
  act(hub.upsert(COLLECTION, newId(), { title, done: false, created: Date.now() }));
});

hub.on("status", (status) => showStatus(status));
hub.on("change", () => render());
hub.on("error", (error) => {
  $("error").textContent = error.message || error.code;
});
showStatus(hub.status);
await hub.start();
await render();
