// The browser client of the hub: a local-first replica in IndexedDB, kept in
// step with the hub over one WebSocket (docs/PROTOCOL.md, version 1).
//
//   import { HubClient } from "/client/hub.js";
//   const hub = new HubClient({ device: "laptop-1", token: () => fetchToken() });
//   await hub.start();
//   await hub.upsert("todos", "t1", { title: "Buy milk", done: false });
//   hub.on("change", () => render(hub.list("todos")));
//
// An ES module without dependencies and without a build step. docs/CLIENTS.md (Browser client)
// describes the API, how tabs share one device, and what each close code does.

// -- HLC stamps (hub/hlc.py) ---------------------------------------------------------

const STAMP_RE = /^[0-9]{13}-[0-9]{4}-[A-Za-z0-9_.:-]{1,64}$/;
const NODE_RE = /^[A-Za-z0-9_.:-]{1,64}$/;
const COLLECTION_RE = /^[A-Za-z0-9_.-]{1,64}$/;
const FIELD_RE = /^[A-Za-z0-9.-][A-Za-z0-9_.-]{0,63}$/; // not starting with "_"
export const MAX_COUNTER = 9999;
const MAX_WALL_MS = 1e13 - 1;
const MAX_VALUE_BYTES = 64 * 1024; // as stored: numbers written out in full
const MAX_VALUE_DEPTH = 128; // arrays and objects inside each other, in one value
const MAX_ACTOR_BYTES = 4 * 1024;
const MAX_ID_CHARS = 128;
// One change, and the push message around it, fit the hub's 1 MiB message limit.
const MAX_CHANGE_BYTES = 1024 * 1024 - 4096;
const MAX_FIELDS_PER_PUSH = 20_000; // field writes of one push (the hub's limit)
// What writing a push's numbers out in full may add, over all its values (the hub's limit).
const MAX_PUSH_GROWTH_BYTES = 1024 * 1024;
// What one message can still carry alone (its push wrapper is under 100 bytes):
// a change queued by an older client is dropped only past this.
const MAX_SENDABLE_CHANGE_BYTES = 1024 * 1024 - 256;
const ORIGINS = Object.freeze(["user", "agent", "system", "migration"]);
// A UTF-16 surrogate without its pair: no UTF-8 for it, so the hub cannot read it.
const LONE_SURROGATE_RE = /[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/;

/** True when `text` is a well-formed stamp `<13 digits>-<4 digits>-<node>`. */
export function isStamp(text) {
  return typeof text === "string" && STAMP_RE.test(text);
}

/** `"<wall_ms:13>-<counter:4>-<node>"`; stamps of this form order as plain strings. */
export function formatStamp(wallMs, counter, node) {
  if (!Number.isInteger(wallMs) || wallMs < 0 || wallMs > MAX_WALL_MS) {
    throw new RangeError(`wall_ms out of range: ${wallMs}`);
  }
  if (!Number.isInteger(counter) || counter < 0 || counter > MAX_COUNTER) {
    throw new RangeError(`counter out of range: ${counter}`);
  }
  if (!NODE_RE.test(node)) throw new RangeError(`bad node: ${node}`);
  return `${String(wallMs).padStart(13, "0")}-${String(counter).padStart(4, "0")}-${node}`;
}

/** `{wallMs, counter, node}` of a stamp; throws on a malformed one. */
export function parseStamp(text) {
  if (!isStamp(text)) throw new RangeError(`not an HLC stamp: ${text}`);
  return {
    wallMs: Number(text.slice(0, 13)),
    counter: Number(text.slice(14, 18)),
    node: text.slice(19),
  };
}

/**
 * One tick of a hybrid logical clock whose state is `{wallMs, counter}`:
 * the next state, greater than the given one and close to `nowMs`.
 * (A spent counter borrows the next millisecond, as hub/hlc.py does.)
 */
export function tickClock(state, nowMs) {
  const { wallMs, counter } = state || { wallMs: 0, counter: 0 };
  if (nowMs > wallMs) return { wallMs: nowMs, counter: 0 };
  if (counter < MAX_COUNTER) return { wallMs, counter: counter + 1 };
  return { wallMs: wallMs + 1, counter: 0 };
}

/** The clock state moved past a stamp seen from elsewhere (never backwards). */
export function observeClock(state, stamp) {
  const seen = parseStamp(stamp);
  const cur = state || { wallMs: 0, counter: 0 };
  if (seen.wallMs > cur.wallMs || (seen.wallMs === cur.wallMs && seen.counter > cur.counter)) {
    return { wallMs: seen.wallMs, counter: seen.counter };
  }
  return cur;
}

// -- The merge (hub/merge.py, exactly) ----------------------------------------------
//
// A record is `{fields: {name: {value, hlc}}, deleted_hlc: string | null}`.
// A field write wins only when its stamp is greater than the stored field's and
// than the record's delete stamp; a delete raises the delete stamp; a field is
// visible only when stamped after the delete stamp. Stamps compare as strings.

const own = (obj, key) => Object.prototype.hasOwnProperty.call(obj, key);

/** A record nobody wrote yet. */
export function newRecord() {
  return { fields: {}, deleted_hlc: null };
}

/** Apply field writes `[name, value, hlc]`; the names that changed. */
export function applyUpsert(record, writes) {
  const changed = [];
  const cut = record.deleted_hlc;
  for (const [name, value, hlc] of writes) {
    if (cut !== null && cut !== undefined && hlc <= cut) continue;
    if (own(record.fields, name) && hlc <= record.fields[name].hlc) continue;
    record.fields[name] = { value, hlc };
    changed.push(name);
  }
  return changed;
}

/** Raise the delete stamp; true when it changed. */
export function applyDelete(record, hlc) {
  if (record.deleted_hlc !== null && record.deleted_hlc !== undefined && hlc <= record.deleted_hlc) {
    return false;
  }
  record.deleted_hlc = hlc;
  return true;
}

/** Apply one change as pushed (`op` upsert or delete); true when it altered the record. */
export function applyChange(record, change) {
  if (change.op === "delete") return applyDelete(record, change.hlc);
  const writes = Object.entries(change.fields).map(([n, f]) => [n, f.value, f.hlc]);
  return applyUpsert(record, writes).length > 0;
}

/** Apply a record delta from a pull or an event (idempotent, any order); true when it altered the record. */
export function applyDelta(record, delta) {
  let changed = false;
  if (delta.deleted_hlc !== null && delta.deleted_hlc !== undefined) {
    changed = applyDelete(record, delta.deleted_hlc);
  }
  const writes = Object.entries(delta.fields || {}).map(([n, f]) => [n, f.value, f.hlc]);
  return applyUpsert(record, writes).length > 0 || changed;
}

/** The fields that are part of the record's state: stamped after its delete stamp. */
export function visibleFields(record) {
  const cut = record.deleted_hlc;
  const out = {};
  for (const [name, f] of Object.entries(record.fields)) {
    if (cut === null || cut === undefined || f.hlc > cut) out[name] = f;
  }
  return out;
}

/** Deleted: it has a delete stamp and no field stamped after it. */
export function isDeleted(record) {
  const cut = record.deleted_hlc;
  if (cut === null || cut === undefined) return false;
  return !Object.values(record.fields).some((f) => f.hlc > cut);
}

// -- IndexedDB, with promises ---------------------------------------------------------
//
// Every read-modify-write runs in one readwrite transaction, and only awaits
// requests of that transaction, so it stays active. IndexedDB runs readwrite
// transactions on the same stores one after another, across tabs too: that is
// what makes the clock tick, the merge and the outbox atomic per device.

const RECORDS = "records";
const OUTBOX = "outbox";
const META = "meta";

function req(request) {
  return new Promise((resolve, reject) => {
    request.onsuccess = () => resolve(request.result);
    request.onerror = () => reject(request.error);
  });
}

function validUser(user) {
  return typeof user === "string" && user.length >= 1 && user.length <= 128 && !user.includes("\0");
}

/** A JWT's claims, read without checking them (the hub does); null when it is no JWT. */
function jwtClaims(token) {
  const parts = typeof token === "string" ? token.split(".") : [];
  if (parts.length !== 3) return null;
  try {
    const body = parts[1].replace(/-/g, "+").replace(/_/g, "/");
    const json = new TextDecoder().decode(Uint8Array.from(atob(body), (c) => c.charCodeAt(0)));
    const claims = JSON.parse(json);
    return claims && typeof claims === "object" ? claims : null;
  } catch {
    return null;
  }
}

function jwtSubject(token) {
  const sub = jwtClaims(token)?.sub;
  return typeof sub === "string" ? sub : null;
}

function jwtExpiry(token) {
  const exp = jwtClaims(token)?.exp;
  return typeof exp === "number" ? exp : null;
}

/**
 * The replica's database: one per user and device ("hub:<device>:<user>", the
 * user URI-encoded, so no two pairs share a name). A replica made before users
 * were in the name ("hub:<device>") is kept when it is this user's.
 */
async function defaultDbName(user, device) {
  const legacy = `hub:${device}`;
  const known = (await indexedDB.databases?.()) || [];
  if (known.some((d) => d.name === legacy)) {
    const db = await openDatabase(legacy);
    try {
      const owner = await transact(db, [META], "readonly", (tx) => req(tx.objectStore(META).get("user")));
      // Its user, or none yet (filled offline, never connected: the version
      // before this one gave it to the first user to connect, as this does).
      if (owner === user || owner === undefined) return legacy;
    } finally {
      db.close();
    }
  }
  return `hub:${device}:${encodeURIComponent(user)}`;
}

/** Walk an IndexedDB cursor: `visit(cursor)` (synchronous) returns false to stop. */
function iterate(request, visit) {
  return new Promise((resolve, reject) => {
    request.onsuccess = () => {
      const cursor = request.result;
      if (!cursor || visit(cursor) === false) resolve();
      else cursor.continue();
    };
    request.onerror = () => reject(request.error);
  });
}

function openDatabase(name) {
  return new Promise((resolve, reject) => {
    const open = indexedDB.open(name, 1);
    open.onupgradeneeded = () => {
      const db = open.result;
      db.createObjectStore(RECORDS); // key [collection, id]
      const outbox = db.createObjectStore(OUTBOX, { keyPath: "seq", autoIncrement: true });
      outbox.createIndex("batch", "batch");
      db.createObjectStore(META);
    };
    open.onsuccess = () => resolve(open.result);
    open.onerror = () => reject(open.error);
    open.onblocked = () => reject(new Error(`IndexedDB ${name} is blocked by an older version`));
  });
}

async function transact(db, stores, mode, work) {
  const tx = db.transaction(stores, mode);
  const finished = new Promise((resolve, reject) => {
    tx.oncomplete = () => resolve();
    tx.onerror = () => reject(tx.error);
    tx.onabort = () => reject(tx.error || new DOMException("transaction aborted", "AbortError"));
  });
  let result;
  try {
    result = await work(tx);
  } catch (err) {
    try {
      tx.abort();
    } catch {
      // already finished
    }
    finished.catch(() => {});
    throw err;
  }
  await finished;
  return result;
}

function recordKey(collection, id) {
  return [collection, id];
}

// -- The client ----------------------------------------------------------------------

const BACKOFF_BASE_MS = 500;
const BACKOFF_CAP_MS = 30_000;
const MAX_BATCH_CHANGES = 200;
const MAX_BATCH_BYTES = 512 * 1024;
const MAX_PUSHES_IN_FLIGHT = 4;
const PULL_LIMIT = 500;
const GAP_WAIT_MS = 150;
// The hub warns of a token's expiry a minute ahead, at once for a token that
// lives less: one refresh per such interval at most, not one per warning.
const REFRESH_MIN_INTERVAL_MS = 15_000;
// A cached token that expires sooner than this (or has: after a long sleep) is
// fetched again before a connect.
const TOKEN_MARGIN_MS = 5_000;
// A connection not welcomed within this long is given up on (a hung hub or proxy).
const WELCOME_TIMEOUT_MS = 15_000;
// Errors after which the same request may succeed later (pushes and pulls).
const RETRYABLE = Object.freeze(["rate_limited", "unavailable", "internal"]);

/** Connection states a client reports in `state`. */
export const STATES = Object.freeze([
  "starting", // not started, or opening its database
  "connecting", // opening the WebSocket and authenticating
  "syncing", // connected; catching up (pull) and sending the outbox
  "online", // connected and caught up
  "offline", // not connected; a reconnect is scheduled (or the browser is offline)
  "unauthorized", // the token was refused (4001); retrying with a fresh token
  "forbidden", // the device was revoked (4003): no more reconnects
  "closed", // close() was called
]);

function fullJitter(attempt) {
  return Math.random() * Math.min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * 2 ** attempt);
}

function randomId(prefix) {
  const bytes = crypto.getRandomValues(new Uint8Array(12));
  return prefix + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function jsonBytes(value) {
  return new TextEncoder().encode(JSON.stringify(value)).length;
}

/** The delay a 1012 close asks for ("... reconnect in 2.3s"), in ms; random 0.5-5 s otherwise. */
export function restartDelayMs(reason) {
  const m = /reconnect in ([0-9]+(?:\.[0-9]+)?)\s*s/.exec(reason || "");
  if (m) return Math.min(60_000, Number(m[1]) * 1000);
  return 500 + Math.random() * 4500;
}

export class HubClient extends EventTarget {
  /**
   * @param {object} options
   * @param {string} options.device        this install's device id, stable across restarts
   * @param {string|function} options.token a JWT, or a function (sync or async) that returns a fresh one
   * @param {string} [options.url]          the hub's base URL (default: this page's origin)
   * @param {string} [options.deviceName]   shown in GET /v1/devices
   * @param {string} [options.platform]     shown in GET /v1/devices
   * @param {string} [options.user]         whose replica this is (default: the token's `sub`);
   *                                        give it to open the replica offline with a token function
   * @param {string} [options.dbName]       IndexedDB database (default "hub:" + device + ":" + user)
   * @param {boolean} [options.tabs]        share one connection among tabs (default true)
   */
  constructor(options) {
    super();
    if (!options || !NODE_RE.test(options.device || "")) {
      throw new TypeError("device must be 1..64 characters of [A-Za-z0-9_.:-]");
    }
    if (!options.token) throw new TypeError("token (a string or a function) is required");
    if (options.user !== undefined && !validUser(options.user)) {
      throw new TypeError("user must be 1..128 characters");
    }
    this.device = options.device;
    this.url = (options.url || globalThis.location.origin).replace(/\/+$/, "");
    this.dbName = options.dbName || null; // by default named after the user, known at start()
    this._tokenSource = options.token;
    this._deviceName = options.deviceName;
    this._platform = options.platform;
    this._shareTabs = options.tabs !== false;

    this.db = null;
    this.state = "starting";
    this.pending = 0;
    this.leader = false;
    this.version = null; // the last version known complete here (leader only)
    this.user = options.user ?? null; // whose replica this is
    this.lastError = null;

    this._closed = false;
    this._channel = null;
    this._releaseLock = null;
    this._lockAbort = null;
    this._ws = null;
    this._ready = false; // welcome received on this._ws
    this._token = null;
    this._refreshing = false; // a token refresh is under way
    this._refreshTimer = null; // one is due at the end of REFRESH_MIN_INTERVAL_MS
    this._refreshedAt = 0;
    this._attempt = 0;
    this._reconnectTimer = null;
    this._heartbeatTimer = null;
    this._lastHeard = 0;
    this._heartbeatMs = 30_000;
    this._requests = new Map(); // message id -> {resolve, reject}
    this._inFlight = new Map(); // push id -> retry timer or null
    this._batchCap = MAX_BATCH_CHANGES; // lowered when the hub takes fewer changes per push
    this._flushing = null;
    this._flushAgain = false;
    this._pulling = null;
    this._pullAgain = false;
    this._ahead = new Set(); // versions seen above this.version
    this._gapTimer = null;
    this._seq = 0;
    this._onOnline = () => this._browserOnline();
    this._onOffline = () => this._browserOffline();
  }

  // -- public API ---------------------------------------------------------------------

  /** Open the replica, join the device's tabs, and connect (or follow the tab that does). */
  async start() {
    // Whose replica: known before anything of it is read or written, so that
    // one user's data is never shown to, or pushed as, another's.
    this.user ??= await this._tokenUser();
    this.dbName ??= await defaultDbName(this.user, this.device);
    const db = await openDatabase(this.dbName);
    db.onversionchange = () => {
      // Deleted or upgraded by another tab: this one lets go (the lock, the socket).
      this._fail("replica_closed", "another tab deleted or upgraded this replica");
      this.close();
      db.close();
    };
    if (this._closed) {
      db.close(); // closed while it opened
      return this;
    }
    this.db = db;
    await this._claimReplica();
    await this._refreshPending();
    if (this._closed) return this;
    if (this._shareTabs && typeof BroadcastChannel !== "undefined") {
      this._channel = new BroadcastChannel(`hub:${this.dbName}`);
      this._channel.onmessage = (ev) => this._onTabMessage(ev.data);
    }
    globalThis.addEventListener?.("online", this._onOnline);
    globalThis.addEventListener?.("offline", this._onOffline);
    if (this._shareTabs && globalThis.navigator?.locks) {
      this._setState("connecting");
      this._broadcast({ type: "hello" }); // the leader answers with its state
      this._lockAbort = new AbortController();
      navigator.locks
        .request(`hub-leader:${this.dbName}`, { signal: this._lockAbort.signal }, () => {
          if (this._closed) return undefined;
          return new Promise((release) => {
            this._releaseLock = release;
            this._becomeLeader();
          });
        })
        .catch(() => {}); // aborted by close()
    } else {
      this._becomeLeader();
    }
    return this;
  }

  /** Write fields of a record (a map of name to any JSON value); applied here at once, pushed soon. */
  async upsert(collection, id, fields, options = {}) {
    checkKey(collection, id);
    const growth = { bytes: 0 }; // what writing numbers out in full adds (the actor's too)
    const extra = changeOptions(options, growth);
    if (fields === null || typeof fields !== "object" || Array.isArray(fields)) {
      throw new TypeError("fields must be an object of name: value");
    }
    const names = Object.keys(fields);
    if (names.length === 0) throw new TypeError("an upsert needs at least one field");
    if (names.length > MAX_FIELDS_PER_PUSH) {
      throw new RangeError(`${names.length} fields; a push writes at most ${MAX_FIELDS_PER_PUSH}`);
    }
    const values = {}; // as the hub will store them: what a JSON round trip gives
    for (const name of names) {
      if (!FIELD_RE.test(name)) {
        throw new TypeError(`bad field name ${JSON.stringify(name)}: [A-Za-z0-9_.-]{1,64}, not starting with _`);
      }
      if (fields[name] === undefined) throw new TypeError(`field ${name} is undefined`);
      values[name] = storedValue(fields[name], MAX_VALUE_BYTES, `field ${name}`, growth);
    }
    if (growth.bytes > MAX_PUSH_GROWTH_BYTES) {
      throw new RangeError(
        `writing the change's numbers out in full adds ${growth.bytes} bytes; a push may add at most ${MAX_PUSH_GROWTH_BYTES}`,
      );
    }
    const build = (stamp) => {
      const out = {};
      for (const n of names) out[n] = { value: values[n], hlc: stamp };
      return { collection, id, op: "upsert", fields: out, ...extra };
    };
    // Every stamp of this device has the same length: measure with any one.
    const size = jsonBytes(build(formatStamp(0, 0, this.device)));
    if (size > MAX_CHANGE_BYTES) {
      throw new RangeError(`the change is ${size} bytes encoded; one push message carries at most ${MAX_CHANGE_BYTES}`);
    }
    return this._writeLocal(
      collection,
      id,
      (stamp, record) => {
        applyUpsert(
          record,
          names.map((n) => [n, values[n], stamp]),
        );
        return build(stamp);
      },
      growth.bytes,
    );
  }

  /** Delete a record (a tombstone; a later upsert revives it with only the newer fields). */
  async delete(collection, id, options = {}) {
    checkKey(collection, id);
    const growth = { bytes: 0 };
    const extra = changeOptions(options, growth);
    return this._writeLocal(
      collection,
      id,
      (stamp, record) => {
        applyDelete(record, stamp);
        return { collection, id, op: "delete", hlc: stamp, ...extra };
      },
      growth.bytes,
    );
  }

  /** A live record's field values, or null when it is deleted or unknown. */
  async get(collection, id) {
    const record = await transact(this.db, [RECORDS], "readonly", (tx) =>
      req(tx.objectStore(RECORDS).get(recordKey(collection, id))),
    );
    if (!record || isDeleted(record)) return null;
    return valuesOf(record);
  }

  /** The live records of a collection, by id: `[{id, fields: {name: value}}]`. */
  async list(collection) {
    const rows = await transact(this.db, [RECORDS], "readonly", (tx) =>
      req(tx.objectStore(RECORDS).getAll(IDBKeyRange.bound([collection], [collection, []]))),
    );
    return rows.filter((r) => !isDeleted(r)).map((r) => ({ id: r.id, fields: valuesOf(r) }));
  }

  /** Every record of the replica with its full merge state (fields with stamps, delete stamp). */
  async records() {
    return transact(this.db, [RECORDS], "readonly", (tx) => req(tx.objectStore(RECORDS).getAll()));
  }

  /** Catch up now: the leader pulls and sends its outbox; another tab asks the leader to. */
  async sync() {
    if (!this.leader) {
      this._broadcast({ type: "sync" });
      return;
    }
    this._flush();
    if (this._ready) await this._pull();
  }

  /** `hub.on("status" | "change" | "error" | "disconnect", fn)`: fn gets the event's detail; returns an unsubscribe. */
  on(type, fn) {
    const listener = (ev) => fn(ev.detail);
    this.addEventListener(type, listener);
    return () => this.removeEventListener(type, listener);
  }

  /** The state, the pending count and the tab's role, as the "status" event carries them. */
  get status() {
    return {
      state: this.state,
      pending: this.pending,
      leader: this.leader,
      version: this.version,
      error: this.lastError,
    };
  }

  /** Stop: close the connection, hand the leadership to another tab, close the database. */
  close() {
    if (this._closed) return;
    this._closed = true;
    clearTimeout(this._reconnectTimer);
    clearTimeout(this._gapTimer);
    this._stopHeartbeat();
    for (const timer of this._inFlight.values()) clearTimeout(timer);
    this._inFlight.clear();
    clearTimeout(this._refreshTimer);
    this._refreshTimer = null;
    if (this._ws) {
      try {
        this._ws.close(1000, "client closed");
      } catch {
        // closing anyway
      }
      this._ws = null;
    }
    this._ready = false;
    for (const { reject } of this._requests.values()) {
      reject(Object.assign(new Error("the client is closed"), { code: "closed" }));
    }
    this._requests.clear();
    globalThis.removeEventListener?.("online", this._onOnline);
    globalThis.removeEventListener?.("offline", this._onOffline);
    this._lockAbort?.abort();
    this._releaseLock?.();
    this.leader = false;
    this._channel?.close();
    this._setState("closed");
    this.db?.close();
  }

  // -- local writes ---------------------------------------------------------------------

  async _writeLocal(collection, id, make, growth = 0) {
    if (this._closed) throw new Error("the client is closed");
    const stamp = await transact(this.db, [RECORDS, OUTBOX, META], "readwrite", async (tx) => {
      const meta = tx.objectStore(META);
      const clock = tickClock(await req(meta.get("clock")), Date.now());
      meta.put(clock, "clock");
      const stamp = formatStamp(clock.wallMs, clock.counter, this.device);
      const records = tx.objectStore(RECORDS);
      const key = recordKey(collection, id);
      const record = (await req(records.get(key))) || { collection, id, ...newRecord() };
      const change = make(stamp, record);
      records.put(record, key);
      tx.objectStore(OUTBOX).add({ change, batch: "", growth });
      return stamp;
    });
    await this._refreshPending();
    const keys = [{ collection, id }];
    this._emit("change", { source: "local", changes: keys });
    this._broadcast({ type: "changed", source: "local", changes: keys });
    if (this.leader) this._flush();
    return stamp;
  }

  // -- tabs -----------------------------------------------------------------------------

  _broadcast(message) {
    try {
      this._channel?.postMessage(message);
    } catch {
      // the channel is closed
    }
  }

  async _onTabMessage(message) {
    if (this._closed) return;
    switch (message.type) {
      case "hello":
        if (this.leader) this._broadcastStatus();
        break;
      case "status":
        if (!this.leader) {
          this.version = message.version;
          this._setState(message.state);
        }
        break;
      case "changed":
        await this._refreshPending();
        this._emit("change", { source: message.source, changes: message.changes });
        if (this.leader && message.source === "local") this._flush();
        break;
      case "sync":
        if (this.leader) this.sync();
        break;
      case "error":
        if (!this.leader) this._emit("error", message.error);
        break;
    }
  }

  _broadcastStatus() {
    this._broadcast({ type: "status", state: this.state, version: this.version });
  }

  _becomeLeader() {
    if (this._closed) return;
    this.leader = true;
    this._setState("connecting");
    this._connect();
  }

  /** The token's `sub`: the user whose replica to open when none was given. */
  async _tokenUser() {
    let token;
    try {
      token = await this._getToken();
    } catch (err) {
      throw Object.assign(
        new Error(`could not get a token to tell whose replica to open (give options.user): ${err.message || err}`),
        { code: "no_user" },
      );
    }
    const user = jwtSubject(token);
    if (!validUser(user)) {
      throw Object.assign(
        new TypeError("options.user is required: the token is not a JWT with a 'sub' (an API key, say)"),
        { code: "no_user" },
      );
    }
    return user;
  }

  /** Mark the replica as this user's, or refuse it when it is another's. */
  async _claimReplica() {
    const owner = await transact(this.db, [META], "readwrite", async (tx) => {
      const meta = tx.objectStore(META);
      const stored = await req(meta.get("user"));
      if (!stored) meta.put(this.user, "user");
      return stored || this.user;
    });
    if (owner !== this.user) {
      this.db.close();
      this.db = null;
      this._setState("forbidden");
      this._closed = true;
      const error = new Error(`this replica belongs to ${owner}, not to ${this.user}`);
      error.code = "wrong_user";
      throw error;
    }
  }

  // -- the connection (leader only) -----------------------------------------------------

  async _getToken() {
    // A cached token about to expire (after a long sleep, say) is not used again.
    const expires = jwtExpiry(this._token);
    if (this._token && typeof this._tokenSource === "function" && expires !== null
        && expires * 1000 - Date.now() < TOKEN_MARGIN_MS) {
      this._token = null;
    }
    if (this._token) return this._token;
    const source = this._tokenSource;
    this._token = typeof source === "function" ? await source() : source;
    return this._token;
  }

  async _connect() {
    if (this._closed || this._ws) return;
    clearTimeout(this._reconnectTimer);
    this._reconnectTimer = null;
    if (globalThis.navigator && navigator.onLine === false) {
      this._setState("offline");
      return; // the "online" event reconnects
    }
    if (this.state !== "unauthorized") this._setState("connecting");
    let token;
    try {
      token = await this._getToken();
    } catch (err) {
      this._fail("token", `could not get a token: ${err.message || err}`);
      if (this.state !== "unauthorized") this._setState("offline");
      this._scheduleReconnect(fullJitter(this._attempt++));
      return;
    }
    if (this._closed || this._ws) return;
    const ws = new WebSocket(this.url.replace(/^http/, "ws") + "/v1/ws");
    this._ws = ws;
    this._ready = false;
    // A hub (or a proxy) that takes the connection and never welcomes it:
    // given up on, and tried again with backoff like any failed connect.
    const welcomeTimer = setTimeout(() => {
      if (ws === this._ws && !this._ready) this._closeSocket(4000, "no welcome from the hub");
    }, WELCOME_TIMEOUT_MS);
    ws.addEventListener("close", () => clearTimeout(welcomeTimer));
    // Messages are handled one after another, in the order they came: the
    // welcome's checks (is this replica the token's user's?) finish before any
    // event that follows it is looked at, and events are merged in order.
    // (A handler never waits for a later message: pulls run beside the chain.)
    let inbox = Promise.resolve();
    ws.onopen = () => {
      const auth = { type: "auth", token, device: this.device };
      if (this._deviceName) auth.device_name = this._deviceName;
      if (this._platform) auth.platform = this._platform;
      ws.send(JSON.stringify(auth));
    };
    ws.onmessage = (ev) => {
      if (ws !== this._ws) return;
      this._lastHeard = Date.now();
      let message;
      try {
        message = JSON.parse(ev.data);
      } catch {
        return;
      }
      inbox = inbox
        .then(() => (ws === this._ws ? this._onMessage(message) : undefined))
        .catch((err) => this._fail("client", String(err.message || err)));
    };
    ws.onclose = (ev) => {
      if (ws !== this._ws) return;
      this._onClose(ev.code, ev.reason);
    };
  }

  _send(message) {
    if (!this._ws || this._ws.readyState !== WebSocket.OPEN) return false;
    this._ws.send(JSON.stringify(message));
    return true;
  }

  _request(message) {
    const id = `${message.type[0]}-${++this._seq}`;
    return new Promise((resolve, reject) => {
      this._requests.set(id, { resolve, reject });
      if (!this._send({ ...message, id })) {
        this._requests.delete(id);
        reject(Object.assign(new Error("not connected"), { code: "disconnected" }));
      }
    });
  }

  async _onMessage(message) {
    if (message.type === "welcome") return this._welcome(message);
    if (!this._ready) return undefined; // nothing counts before a welcome that passed its checks
    switch (message.type) {
      case "ack":
        return this._acked(message);
      case "changes": {
        const waiting = this._requests.get(message.id);
        if (waiting) {
          this._requests.delete(message.id);
          waiting.resolve(message);
        }
        return undefined;
      }
      case "error":
        return this._onError(message);
      case "change":
        return this._onChange(message);
      case "sync_available":
        if (this.version === null || message.version > this.version) this._pull();
        return undefined;
      case "auth_expiring":
        this._refreshSoon();
        return undefined;
      default:
        return undefined; // pong, auth_ok, and anything newer
    }
  }

  async _welcome(message) {
    if (message.user !== this.user) {
      // The token (a token function's newest) is another user's.
      this._fail("wrong_user", `this replica belongs to ${this.user}, the token to ${message.user}`);
      this._setState("forbidden");
      this._closeSocket(1000, "wrong user");
      return;
    }
    this._ready = true;
    this._heartbeatMs = (message.heartbeat_s || 30) * 1000;
    this._startHeartbeat();
    this.lastError = null;
    this._setState("syncing");
    this._flush();
    this._pull(); // not awaited: its answers come through the message chain
  }

  _onClose(code, reason) {
    const welcomed = this._ready;
    this._ws = null;
    this._ready = false;
    this._stopHeartbeat();
    clearTimeout(this._refreshTimer); // a refresh due on this connection: its warnings went with it
    this._refreshTimer = null;
    for (const { reject } of this._requests.values()) {
      reject(Object.assign(new Error("connection closed"), { code: "disconnected" }));
    }
    this._requests.clear();
    for (const timer of this._inFlight.values()) clearTimeout(timer);
    this._inFlight.clear();
    if (this._closed || this.state === "forbidden") return;
    let delay;
    switch (code) {
      case 1012: // the hub restarts: come back when its hint says
        delay = restartDelayMs(reason);
        break;
      case 1013:
        // Too slow (after a welcome): reconnect soon, the pull on connect
        // catches up. Before a welcome it means the hub cannot serve now (its
        // database is down): repeated, it backs off like any failed connect.
        delay = welcomed && this._attempt === 0 ? Math.random() * 1000 : fullJitter(this._attempt);
        this._attempt++;
        break;
      case 4001: // unauthenticated: a fresh token, then back off
        this._token = null;
        this._fail("unauthorized", reason || "unauthenticated");
        this._setState("unauthorized");
        delay = Math.max(1000, fullJitter(this._attempt++));
        this._emit("disconnect", { code, reason, reconnectInMs: Math.round(delay) });
        this._scheduleReconnect(delay);
        return;
      case 4003: // forbidden or revoked: stay away
        this._fail("forbidden", reason || "forbidden");
        this._setState("forbidden");
        this._emit("disconnect", { code, reason, reconnectInMs: null });
        return;
      case 4010: // the token expired: a fresh one, at once
        this._token = null;
        delay = Math.random() * 500;
        break;
      default: // network loss, heartbeat, rate or connection limits: back off
        delay = fullJitter(this._attempt++);
    }
    this._setState("offline");
    this._emit("disconnect", { code, reason, reconnectInMs: Math.round(delay) });
    this._scheduleReconnect(delay);
  }

  _scheduleReconnect(delay) {
    if (this._closed) return;
    clearTimeout(this._reconnectTimer);
    this._reconnectTimer = setTimeout(() => this._connect(), delay);
  }

  _closeSocket(code, reason) {
    const ws = this._ws;
    if (!ws) return;
    try {
      ws.close(code, reason);
    } catch {
      // closing anyway
    }
    // The close event of a socket closed from here may be slow (or never come offline).
    this._onClose(code === 1000 ? 4999 : code, reason);
  }

  _browserOffline() {
    if (!this.leader) return;
    clearTimeout(this._reconnectTimer);
    if (this._ws) {
      const ws = this._ws;
      this._ws = null;
      this._onClose(1006, "offline");
      try {
        ws.close(1000, "offline");
      } catch {
        // closing anyway
      }
    }
    clearTimeout(this._reconnectTimer);
    this._setState("offline");
  }

  _browserOnline() {
    if (!this.leader || this._closed || this.state === "forbidden") return;
    this._attempt = 0;
    if (!this._ws) this._connect();
  }

  _startHeartbeat() {
    this._stopHeartbeat();
    this._lastHeard = Date.now();
    const every = Math.max(1000, this._heartbeatMs / 2);
    this._heartbeatTimer = setInterval(() => {
      const silent = Date.now() - this._lastHeard;
      if (silent > 2 * this._heartbeatMs + 5000) {
        this._closeSocket(4000, "no answer from the hub"); // a half-open connection
      } else if (silent >= every) {
        this._send({ type: "ping" });
      }
    }, every);
  }

  _stopHeartbeat() {
    clearInterval(this._heartbeatTimer);
    this._heartbeatTimer = null;
  }

  _refreshSoon() {
    if (this._refreshing || this._refreshTimer) return; // one at a time
    const wait = this._refreshedAt + REFRESH_MIN_INTERVAL_MS - Date.now();
    if (wait > 0) {
      this._refreshTimer = setTimeout(() => {
        this._refreshTimer = null;
        this._refreshToken();
      }, wait);
      return;
    }
    this._refreshToken(); // not awaited: the token function may take its time
  }

  async _refreshToken() {
    this._refreshing = true;
    this._refreshedAt = Date.now();
    this._token = null;
    try {
      const token = await this._getToken();
      this._send({ type: "auth", token, id: `a-${++this._seq}` });
    } catch (err) {
      this._fail("token", `could not refresh the token: ${err.message || err}`);
    } finally {
      this._refreshing = false;
    }
  }

  async _onError(message) {
    const waiting = message.id && this._requests.get(message.id);
    if (waiting) {
      this._requests.delete(message.id);
      waiting.reject(
        Object.assign(new Error(message.message), { code: message.code, retryAfter: message.retry_after }),
      );
      return;
    }
    if (message.id && this._inFlight.has(message.id)) {
      await this._pushFailed(message.id, message);
      return;
    }
    this._fail(message.code, message.message);
  }

  // -- versions and pulls ---------------------------------------------------------------

  async _onChange(message) {
    await this._applyRemote(message.changes || []);
    this._sawVersion(message.version, message.prev);
  }

  /** Version bookkeeping: `version` is complete here; `_ahead` holds versions seen above it. */
  _sawVersion(version, prev) {
    if (this.version === null) {
      this._ahead.add(version); // the first pull decides
      return;
    }
    if (version <= this.version) return;
    if (prev === this.version) this.version = version;
    else this._ahead.add(version);
    this._drain();
  }

  _drain() {
    while (this._ahead.has(this.version + 1)) {
      this._ahead.delete(this.version + 1);
      this.version += 1;
    }
    for (const v of this._ahead) if (v <= this.version) this._ahead.delete(v);
    this._broadcastStatus();
    if (this._ahead.size > 0 && !this._gapTimer) {
      // A gap; an ack in flight may still fill it. Check again shortly, then pull.
      this._gapTimer = setTimeout(() => {
        this._gapTimer = null;
        for (const v of this._ahead) if (v <= this.version) this._ahead.delete(v);
        if (this._ahead.size > 0) this._pull();
      }, GAP_WAIT_MS);
    }
  }

  _pull() {
    if (this._pulling) {
      this._pullAgain = true;
      return this._pulling;
    }
    const run = (async () => {
      await null; // below, _pulling is set before this ends
      try {
        do {
          this._pullAgain = false;
          await this._pullToEnd();
        } while (this._pullAgain && this._ready);
        this._attempt = 0; // connected and caught up: the next loss starts backing off afresh
        if (this._ready && this.state === "syncing") this._setState("online");
      } catch (err) {
        if (err.code !== "disconnected" && !this._closed) this._fail(err.code || "client", err.message);
      }
    })();
    this._pulling = run;
    run.finally(() => {
      if (this._pulling !== run) return;
      this._pulling = null;
      if (this._pullAgain && this._ready) this._pull(); // asked for while this one was failing
    });
    return run;
  }

  async _pullToEnd() {
    let reset = false;
    let failures = 0;
    for (;;) {
      // The cursor and the reset under way (if any) are read together: a page
      // asked from 0 under this reset is the one that may replace the replica.
      const { since, resetting } = await transact(this.db, [META], "readonly", async (tx) => {
        const meta = tx.objectStore(META);
        return { since: await req(meta.get("cursor")), resetting: await req(meta.get("resetting")) };
      });
      let page;
      try {
        page = await this._request({ type: "pull", since: since || 0, limit: PULL_LIMIT });
      } catch (err) {
        if (err.code === "reset_required") {
          await this._startReset();
          continue;
        }
        if (RETRYABLE.includes(err.code) && this._ready && !this._closed) {
          // The hub could not answer now: ask again later, still syncing.
          this._setState("syncing");
          failures += 1;
          const wait = err.retryAfter > 0 ? err.retryAfter * 1000 : Math.max(250, fullJitter(failures));
          await new Promise((resolve) => setTimeout(resolve, Math.min(wait, BACKOFF_CAP_MS)));
          if (!this._ready || this._closed) {
            throw Object.assign(new Error("connection closed"), { code: "disconnected" });
          }
          continue;
        }
        throw err;
      }
      failures = 0;
      const applied = await this._applyRemote(page.changes, page.cursor, resetting ?? null);
      if (applied === "stale") continue; // asked before a reset began: ask again, from 0
      if (applied === "reset") reset = true;
      if (!page.has_more) {
        this.version = Math.max(this.version ?? 0, page.version);
        this._drain();
        // The reset's first page replaced the replica with the hub's state and
        // what the outbox held then. A push acked before that page was applied
        // had already left the outbox, and the page may have been read before
        // its commit: one more pull from the new cursor brings it back.
        if (reset) this._pullAgain = true;
        return;
      }
    }
  }

  /**
   * Start again from 0 (410 reset_required, or a push the hub refused): the
   * first page asked from 0 after this replaces the replica. The reset is
   * marked with an id of its own, so that a page asked before it (still on
   * its way) is not taken for that first page.
   */
  async _startReset() {
    await transact(this.db, [META], "readwrite", async (tx) => {
      const meta = tx.objectStore(META);
      meta.put(0, "cursor");
      meta.put(randomId("r-"), "resetting");
    });
    this.version = null;
    this._ahead.clear();
  }

  /**
   * Merge deltas into the replica (and, for a pull's page, move the cursor) in
   * one transaction. A page comes with the reset it was asked under (`asked`,
   * null for none). While a reset is under way, only the page asked from 0
   * under it replaces the replica; a page asked before is dropped ("stale").
   * Returns "stale", "reset" (the replica was replaced) or "merged".
   */
  async _applyRemote(deltas, cursor, asked = null) {
    let reset = false;
    const touched = await transact(this.db, [RECORDS, OUTBOX, META], "readwrite", async (tx) => {
      const meta = tx.objectStore(META);
      const records = tx.objectStore(RECORDS);
      const resetting = cursor === undefined ? null : await req(meta.get("resetting"));
      if (resetting && resetting !== asked) return null; // from before the reset: its cursor is no use now
      if (resetting) {
        // Rebuild from the hub's state: drop the replica, keep what is not pushed yet.
        reset = true;
        records.clear();
        const local = await req(tx.objectStore(OUTBOX).getAll());
        for (const { change } of local) {
          const key = recordKey(change.collection, change.id);
          const record = (await req(records.get(key))) || {
            collection: change.collection,
            id: change.id,
            ...newRecord(),
          };
          applyChange(record, change);
          records.put(record, key);
        }
        meta.delete("resetting");
      }
      let clock = await req(meta.get("clock"));
      const out = [];
      for (const delta of deltas) {
        const key = recordKey(delta.collection, delta.id);
        const record = (await req(records.get(key))) || {
          collection: delta.collection,
          id: delta.id,
          ...newRecord(),
        };
        if (applyDelta(record, delta)) {
          records.put(record, key);
          out.push({ collection: delta.collection, id: delta.id });
        }
        for (const f of Object.values(delta.fields || {})) clock = observeClock(clock, f.hlc);
        if (delta.deleted_hlc) clock = observeClock(clock, delta.deleted_hlc);
      }
      if (clock) meta.put(clock, "clock");
      if (cursor !== undefined) meta.put(cursor, "cursor");
      return out;
    });
    if (touched === null) return "stale";
    if (reset) {
      this._emit("change", { source: "reset", changes: null });
      this._broadcast({ type: "changed", source: "reset", changes: null });
      return "reset";
    }
    if (touched.length > 0) {
      this._emit("change", { source: "remote", changes: touched });
      this._broadcast({ type: "changed", source: "remote", changes: touched });
    }
    return "merged";
  }

  // -- the outbox -------------------------------------------------------------------------

  _flush() {
    if (this._flushing) {
      this._flushAgain = true;
      return;
    }
    const run = (async () => {
      await null; // below, _flushing is set before this ends
      do {
        this._flushAgain = false;
        while (this._ready && this._inFlight.size < MAX_PUSHES_IN_FLIGHT) {
          const batch = await this._claimBatch();
          if (batch && batch.tooBig.length > 0) await this._droppedTooBig(batch.tooBig);
          if (!batch || !batch.id || !this._ready) break;
          this._inFlight.set(batch.id, null);
          if (!this._send({ type: "push", id: batch.id, changes: batch.changes })) {
            this._inFlight.delete(batch.id);
            break;
          }
        }
      } while (this._flushAgain && this._ready);
    })();
    this._flushing = run;
    run
      .catch((err) => this._fail("client", String(err.message || err)))
      .finally(() => {
        if (this._flushing !== run) return;
        this._flushing = null;
        if (this._flushAgain && this._ready) this._flush();
      });
  }

  /**
   * The next push to send: a batch sent before but not acked (same id, same
   * changes: the hub answers a replay with the same ack), or else a new batch
   * of unsent changes, marked with its id in the outbox before it is sent.
   */
  async _claimBatch() {
    return transact(this.db, [OUTBOX], "readwrite", async (tx) => {
      const outbox = tx.objectStore(OUTBOX);
      const byBatch = outbox.index("batch");
      // A batch claimed for a push that is not under way (its connection
      // closed): sent again, whole and under its id, the oldest first. Only
      // the claimed entries are read here, and of the rest only one batch's
      // worth: a long offline outbox costs each batch what it takes, not
      // the whole outbox again.
      const stale = [];
      await iterate(byBatch.openKeyCursor(IDBKeyRange.lowerBound("", true), "nextunique"), (c) => {
        if (!this._inFlight.has(c.key)) stale.push(c.key);
      });
      let resend = null;
      for (const id of stale) {
        const entries = await req(byBatch.getAll(id));
        if (entries.length > 0 && (!resend || entries[0].seq < resend.entries[0].seq)) {
          resend = { id, entries };
        }
      }
      // A change too big for one message (queued before upsert checked its
      // size) would close every connection that sends it (1009): it leaves the
      // outbox here, and is reported, instead.
      const tooBig = [];
      if (resend) {
        const changes = [];
        for (const entry of resend.entries) {
          if (jsonBytes(entry.change) > MAX_SENDABLE_CHANGE_BYTES) {
            tooBig.push(entry.change);
            outbox.delete(entry.seq);
          } else {
            changes.push(entry.change);
          }
        }
        if (changes.length > 0) return { id: resend.id, changes, tooBig };
      }
      // At most 200 changes and 512 KiB, or one change alone (at most
      // MAX_CHANGE_BYTES): either way one message carries it. And within the
      // hub's limits of a push: fields written, and numbers written out.
      const fresh = [];
      let bytes = 0;
      let fields = 0;
      let growth = 0;
      await iterate(byBatch.openCursor(IDBKeyRange.only("")), (cursor) => {
        const entry = cursor.value;
        const size = jsonBytes(entry.change);
        if (size > MAX_SENDABLE_CHANGE_BYTES) {
          tooBig.push(entry.change);
          cursor.delete();
          return true;
        }
        const count = Object.keys(entry.change.fields || {}).length || 1;
        const adds = entry.growth || 0;
        if (
          fresh.length >= this._batchCap ||
          (fresh.length > 0 &&
            (bytes + size > MAX_BATCH_BYTES ||
              fields + count > MAX_FIELDS_PER_PUSH ||
              growth + adds > MAX_PUSH_GROWTH_BYTES))
        ) {
          return false;
        }
        fresh.push(entry);
        bytes += size;
        fields += count;
        growth += adds;
        return true;
      });
      if (fresh.length === 0) return tooBig.length > 0 ? { id: null, changes: [], tooBig } : null;
      const id = randomId("p-");
      for (const entry of fresh) {
        entry.batch = id;
        outbox.put(entry);
      }
      return { id, changes: fresh.map((e) => e.change), tooBig };
    });
  }

  /** Changes dropped from the outbox as too big to send: say so, and rebuild the replica without them. */
  async _droppedTooBig(changes) {
    await this._refreshPending();
    this._fail("payload_too_large", `${changes.length} change(s) too big for one push message, dropped`, changes);
    await this._startReset();
    this._pull();
  }

  async _acked(message) {
    if (!this._inFlight.has(message.id)) return;
    await this._dropBatch(message.id);
    this._inFlight.delete(message.id);
    if (message.applied > 0) this._sawVersion(message.version, null);
    this._flush();
  }

  async _dropBatch(id) {
    const dropped = await transact(this.db, [OUTBOX], "readwrite", async (tx) => {
      const outbox = tx.objectStore(OUTBOX);
      const keys = await req(outbox.index("batch").getAllKeys(id));
      const entries = [];
      for (const key of keys) {
        entries.push(await req(outbox.get(key)));
        outbox.delete(key);
      }
      return entries;
    });
    await this._refreshPending();
    this._broadcast({ type: "changed", source: "ack", changes: [] });
    return dropped;
  }

  async _pushFailed(id, error) {
    const { code, message: text } = error;
    switch (code) {
      case "rate_limited":
      case "unavailable":
      case "internal":
      case "clock_skew": {
        // Try the same push again later; the hub or its clock may be fine by then.
        let wait = code === "rate_limited" ? 1000 : Math.max(2000, fullJitter(4));
        if (error.retry_after > 0) wait = Math.min(BACKOFF_CAP_MS, error.retry_after * 1000);
        if (code === "clock_skew") this._fail(code, text);
        this._inFlight.set(
          id,
          setTimeout(() => {
            this._inFlight.delete(id);
            this._flush();
          }, wait),
        );
        return;
      }
      case "idempotency_key_reused": {
        // Another push holds this id: send the same changes under a new one.
        await this._renameBatch(id, null);
        this._inFlight.delete(id);
        this._flush();
        return;
      }
      case "payload_too_large":
        // The hub takes fewer changes in one push than this one held (its
        // HUB_MAX_CHANGES_PER_PUSH may be lower than 200): the same changes go
        // again in two halves, and pushes stay that small from now on. A lone
        // change it still refuses is dropped, as below.
        if (await this._splitBatch(id)) {
          this._inFlight.delete(id);
          this._flush();
          return;
        }
      // falls through
      default: {
        // The hub refuses these changes for good (invalid_change, payload_too_large,
        // forbidden). When it names the one change it refuses, only that one is
        // dropped and the others go again under a new id (the hub wrote none of
        // them); otherwise the whole push is. Either way: say so, and rebuild the
        // replica from the hub's state, so that it does not keep what was refused.
        const index = code === "invalid_change" ? refusedIndex(error) : null;
        const dropped = (index !== null && (await this._renameBatch(id, index))) || (await this._dropBatch(id));
        this._inFlight.delete(id);
        await this._startReset();
        this._fail(
          code,
          text,
          dropped.map((e) => e.change),
        );
        this._pull();
        this._flush();
      }
    }
  }

  /**
   * Give the changes of push `id` a new push id, leaving out the one at
   * `without` (its index in the push; null: none), which leaves the outbox.
   * Returns the outbox entries left out; null (and nothing changed) when the
   * push has no change at `without`.
   */
  /** Move the changes of a refused push to two new pushes, half each; false for a lone change. */
  async _splitBatch(id) {
    const first = randomId("p-");
    const second = randomId("p-");
    const count = await transact(this.db, [OUTBOX], "readwrite", async (tx) => {
      const outbox = tx.objectStore(OUTBOX);
      const keys = await req(outbox.index("batch").getAllKeys(id)); // in seq order
      if (keys.length < 2) return keys.length;
      const half = Math.ceil(keys.length / 2);
      for (const [i, key] of keys.entries()) {
        const entry = await req(outbox.get(key));
        entry.batch = i < half ? first : second;
        outbox.put(entry);
      }
      return keys.length;
    });
    if (count < 2) return false;
    this._batchCap = Math.max(1, Math.min(this._batchCap, Math.ceil(count / 2)));
    return true;
  }

  async _renameBatch(id, without) {
    const fresh = randomId("p-");
    const dropped = await transact(this.db, [OUTBOX], "readwrite", async (tx) => {
      const outbox = tx.objectStore(OUTBOX);
      // Keys in seq order: the order the changes went out in.
      const keys = await req(outbox.index("batch").getAllKeys(id));
      if (without !== null && !(without < keys.length)) return null;
      const out = [];
      for (const [i, key] of keys.entries()) {
        const entry = await req(outbox.get(key));
        if (i === without) {
          out.push(entry);
          outbox.delete(key);
        } else {
          entry.batch = fresh;
          outbox.put(entry);
        }
      }
      return out;
    });
    if (dropped && dropped.length > 0) {
      await this._refreshPending();
      this._broadcast({ type: "changed", source: "ack", changes: [] });
    }
    return dropped;
  }

  // -- state and events --------------------------------------------------------------------

  async _refreshPending() {
    if (!this.db) return;
    let count;
    try {
      count = await transact(this.db, [OUTBOX], "readonly", (tx) => req(tx.objectStore(OUTBOX).count()));
    } catch {
      return; // closed
    }
    if (count !== this.pending) {
      this.pending = count;
      this._emit("status", this.status);
    }
  }

  _setState(state) {
    if (this._closed && state !== "closed") return;
    if (state === this.state) return;
    this.state = state;
    this._emit("status", this.status);
    if (this.leader) this._broadcastStatus();
  }

  _fail(code, message, changes) {
    if (this._closed) return; // what ends with the client is nobody's error
    const error = { code, message };
    if (changes) error.changes = changes;
    this.lastError = error;
    this._emit("error", error);
    this._broadcast({ type: "error", error });
  }

  _emit(type, detail) {
    // Once closed, only the closing itself is told (work still under way
    // when close() came may fail, and is nobody's concern).
    if (this._closed && !(type === "status" && detail.state === "closed")) return;
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }
}

function checkKey(collection, id) {
  if (typeof collection !== "string" || !COLLECTION_RE.test(collection)) {
    throw new TypeError("collection must be 1..64 characters of [A-Za-z0-9_.-]");
  }
  // The hub counts characters (code points), not UTF-16 units.
  const chars = typeof id === "string" ? [...id].length : 0;
  if (chars < 1 || chars > MAX_ID_CHARS) {
    throw new TypeError(`id must be a string of 1..${MAX_ID_CHARS} characters`);
  }
  checkText(id, "id");
}

/** Strings the hub can store: no U+0000 (jsonb cannot hold it), no lone surrogate (not UTF-8). */
function checkText(text, what) {
  if (text.includes("\u0000")) throw new TypeError(`${what}: strings may not contain U+0000`);
  if (LONE_SURROGATE_RE.test(text)) {
    throw new TypeError(`${what}: a string holds an unpaired UTF-16 surrogate`);
  }
}

/**
 * The length of a number as PostgreSQL's jsonb writes it: in full, without an
 * exponent ("1e+308" is 309 digits, "1.5e-7" is "0.00000015").
 */
function writtenOutLength(text) {
  const m = /^(-?)([0-9]+)(?:\.([0-9]+))?e([-+]?[0-9]+)$/.exec(text);
  if (!m) return text.length;
  const fraction = m[3] || "";
  const digits = m[2].length + fraction.length;
  const exponent = Number(m[4]) - fraction.length;
  let full;
  if (exponent >= 0) full = digits + exponent; // digits, then zeros
  else if (-exponent >= digits) full = 2 - exponent; // "0.", zeros, digits
  else full = digits + 1; // a point among the digits
  return Math.max(text.length, full + m[1].length);
}

/**
 * A value as the hub will store it (what a JSON round trip makes of it),
 * checked as the hub checks it: a JSON value, finite numbers, strings and keys
 * without U+0000, at most 128 arrays or objects deep, at most `limit` bytes
 * with every number written out in full. Throws TypeError or RangeError.
 */
function storedValue(value, limit, what, growth = null) {
  let text;
  try {
    text = JSON.stringify(value, (_key, v) => {
      if (typeof v === "number" && !Number.isFinite(v)) {
        throw Object.assign(new RangeError(`${what}: ${v} is not a JSON number`), { own: true });
      }
      return v;
    });
  } catch (err) {
    if (err.own) throw err;
    if (err instanceof RangeError) {
      throw new RangeError(`${what}: nested more than ${MAX_VALUE_DEPTH} arrays or objects deep`);
    }
    throw new TypeError(`${what}: not a JSON value (${err.message || err})`);
  }
  if (text === undefined) throw new TypeError(`${what}: not a JSON value`);
  const plain = JSON.parse(text);
  let excess = 0; // what writing numbers out in full adds
  const stack = [[plain, 0]];
  while (stack.length > 0) {
    const [item, depth] = stack.pop();
    if (typeof item === "string") {
      checkText(item, what);
    } else if (typeof item === "number") {
      const written = String(item); // as JSON.stringify wrote it
      excess += writtenOutLength(written) - written.length;
    } else if (item !== null && typeof item === "object") {
      if (depth >= MAX_VALUE_DEPTH) {
        throw new RangeError(`${what}: nested more than ${MAX_VALUE_DEPTH} arrays or objects deep`);
      }
      if (Array.isArray(item)) {
        for (const v of item) stack.push([v, depth + 1]);
      } else {
        for (const [k, v] of Object.entries(item)) {
          checkText(k, what);
          stack.push([v, depth + 1]);
        }
      }
    }
  }
  const size = new TextEncoder().encode(text).length + excess;
  if (growth) growth.bytes += excess;
  if (size > limit) {
    const how = excess > 0 ? " (numbers written out in full)" : "";
    throw new RangeError(`${what}: ${size} bytes as stored${how}, the limit is ${limit}`);
  }
  return plain;
}

/** The `origin` and `actor` of a change, checked; `{}` when neither is given. */
function changeOptions(options, growth = null) {
  const out = {};
  if (options === null || options === undefined) return out;
  if (typeof options !== "object") throw new TypeError("options must be an object {origin, actor}");
  if (options.origin !== undefined && options.origin !== null) {
    if (!ORIGINS.includes(options.origin)) {
      throw new TypeError(`origin must be one of ${ORIGINS.join(", ")}, not ${JSON.stringify(options.origin)}`);
    }
    out.origin = options.origin;
  }
  if (options.actor !== undefined && options.actor !== null) {
    out.actor = storedValue(options.actor, MAX_ACTOR_BYTES, "actor", growth);
  }
  return out;
}

/** The index of the change an `invalid_change` error names, or null. */
function refusedIndex(error) {
  const index = error.details?.index;
  if (Number.isInteger(index)) return index;
  const m = /^changes\[([0-9]+)\]/.exec(error.message || "");
  return m ? Number(m[1]) : null;
}

function valuesOf(record) {
  const out = {};
  for (const [name, f] of Object.entries(visibleFields(record))) out[name] = f.value;
  return out;
}
