// omnicall call page: camera + microphone to the server over WebRTC, the model's voice back,
// a data channel for text, state and controls. No build step; plain browser APIs.
"use strict";

const $ = (id) => document.getElementById(id);

// Counters for tests and for the curious (read with window.omnicallStats).
const stats = {
  connectionState: "new",
  iceConnectionState: "new",
  dataChannelState: "closed",
  callId: null,
  modelState: null,
  eventsReceived: 0,
  eventsByType: {},
  userTurns: 0,
  assistantTextDeltas: 0,
  assistantText: "",
  pauses: 0,
  resumes: 0,
  errors: [],
  micLevel: 0,
  maxMicLevel: 0,
  modelLevel: 0,
  maxModelLevel: 0,
  audioPacketsReceived: 0,
  audioSamplesReceived: 0,
  audioEnergy: 0,
  audioLevel: 0,
  videoFramesSent: 0,
  videoCodec: null,
  // Camera frames the Thinker took into the context, for the last turn with timings.
  thinkerVideoFrames: 0,
  turnLatencies: [],
};
window.omnicallStats = stats;

let pc = null;
let dc = null;
let localStream = null;
let callUrl = null;
let audioContext = null;
let meterTimer = null;
let statsTimer = null;
const turns = new Map(); // turn -> {user, assistant, userTurnAt, heardAt, timings, row}

function setBadge(text, cls) {
  const b = $("connection");
  b.textContent = text;
  b.className = "badge " + cls;
}

function showError(message) {
  stats.errors.push(message);
  const e = $("error");
  e.textContent = message;
  e.hidden = false;
}

function clearError() {
  $("error").hidden = true;
}

function token() {
  return $("token").value.trim();
}

function authHeaders(extra = {}) {
  const t = token();
  return t ? { ...extra, Authorization: "Bearer " + t } : extra;
}

let iceServers = [];

async function fetchInfo() {
  return await (await fetch("v1/info", { headers: authHeaders() })).json();
}

async function loadInfo() {
  const hashToken = new URLSearchParams(location.hash.slice(1)).get("token");
  if (hashToken) $("token").value = hashToken;
  try {
    const info = await fetchInfo();
    iceServers = info.ice_servers || [];
    const select = $("voice");
    select.innerHTML = "";
    for (const v of info.voices) {
      const o = document.createElement("option");
      o.value = o.textContent = v;
      select.appendChild(o);
    }
    if (info.voice) select.value = info.voice;
    $("reply-mode").value = info.reply_mode || "voice";
    $("token-row").hidden = !info.token_required;
  } catch (e) {
    showError("cannot reach the server: " + e);
  }
}

// Level of a stream: RMS of the last analyser window, 0..1.
function levelMeter(stream) {
  if (!audioContext) audioContext = new AudioContext();
  const source = audioContext.createMediaStreamSource(stream);
  const analyser = audioContext.createAnalyser();
  analyser.fftSize = 1024;
  source.connect(analyser);
  const buf = new Float32Array(analyser.fftSize);
  return () => {
    analyser.getFloatTimeDomainData(buf);
    let sum = 0;
    for (const v of buf) sum += v * v;
    return Math.sqrt(sum / buf.length);
  };
}

function addEntry(who, text, turn) {
  const li = document.createElement("li");
  li.className = who;
  const label = document.createElement("span");
  label.className = "who";
  label.textContent = who === "user" ? "You" : who === "assistant" ? "Model" : "—";
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  li.append(label, body);
  if (turn !== undefined) li.dataset.turn = turn;
  $("transcript").appendChild(li);
  li.scrollIntoView({ block: "end" });
  return body;
}

function turnOf(n) {
  if (!turns.has(n)) turns.set(n, { user: null, assistant: null, userTurnAt: null, heardAt: null });
  return turns.get(n);
}

function fmt(ms) {
  return ms === null || ms === undefined || Number.isNaN(ms) ? "–" : Math.round(ms) + " ms";
}

function renderLatency(n) {
  const t = turnOf(n);
  const m = t.timings;
  if (!t.row) {
    t.row = document.createElement("tr");
    $("latency").querySelector("tbody").appendChild(t.row);
  }
  const since = (x) => (m && m.speech_end_ms != null && x != null ? x - m.speech_end_ms : null);
  let heard = null;
  if (t.heardAt != null && t.userTurnAt != null) {
    heard = t.heardAt - t.userTurnAt + (since(m && m.end_of_turn_ms) || 0);
  }
  const cells = [n, fmt(since(m && m.end_of_turn_ms)), fmt(since(m && m.first_text_token_ms)),
    fmt(since(m && m.first_audio_frame_ms)), fmt(heard)];
  t.row.innerHTML = "";
  for (const c of cells) {
    const td = document.createElement("td");
    td.textContent = c;
    t.row.appendChild(td);
  }
  stats.turnLatencies[n] = { turn: n, timings: m || null, heardMs: heard };
}

function onMessage(raw) {
  let msg;
  try {
    msg = JSON.parse(raw);
  } catch {
    return;
  }
  stats.eventsReceived += 1;
  stats.eventsByType[msg.type] = (stats.eventsByType[msg.type] || 0) + 1;
  switch (msg.type) {
    case "hello":
      stats.callId = msg.call_id;
      break;
    case "state": {
      stats.modelState = msg.state;
      const s = $("model-state");
      s.textContent = msg.state.replace("_", " ");
      s.className = "model-state " + msg.state;
      break;
    }
    case "user_turn": {
      stats.userTurns += 1;
      const t = turnOf(msg.turn);
      t.userTurnAt = performance.now();
      const what = msg.text != null ? msg.text
        : `(${(msg.audio_ms / 1000).toFixed(1)} s of speech` +
          (msg.video_frames ? `, ${msg.video_frames} camera frames)` : ")");
      if (!t.user) t.user = addEntry("user", what, msg.turn);
      break;
    }
    case "assistant_text": {
      stats.assistantTextDeltas += 1;
      stats.assistantText += msg.delta;
      const t = turnOf(msg.turn);
      if (!t.assistant) t.assistant = addEntry("assistant", "", msg.turn);
      t.assistant.textContent += msg.delta;
      break;
    }
    case "interrupted": {
      const t = turnOf(msg.turn);
      if (t.assistant) {
        t.assistant.textContent = msg.kept_text;
        t.assistant.parentElement.classList.add("cut");
      }
      break;
    }
    case "paused": {
      // speech over the answer: its voice stops while the server tells a barge-in from a
      // backchannel
      const s = $("model-state");
      s.textContent = "paused";
      s.className = "model-state paused";
      stats.pauses += 1;
      break;
    }
    case "resumed": {
      const s = $("model-state");
      const state = stats.modelState || "speaking";
      s.textContent = state.replace("_", " ");
      s.className = "model-state " + state;
      stats.resumes += 1;
      break;
    }
    case "answer_done":
      break;
    case "timings":
      stats.thinkerVideoFrames = msg.video_frames || 0;
      turnOf(msg.turn).timings = msg;
      renderLatency(msg.turn);
      break;
    case "error":
      showError(msg.message);
      break;
  }
}

function send(obj) {
  if (dc && dc.readyState === "open") dc.send(JSON.stringify(obj));
}

async function waitForIce(peer, ms) {
  if (peer.iceGatheringState === "complete") return;
  await new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    peer.addEventListener("icegatheringstatechange", () => {
      if (peer.iceGatheringState === "complete") {
        clearTimeout(timer);
        resolve();
      }
    });
  });
}

async function getMedia() {
  const audio = { echoCancellation: true, noiseSuppression: true, autoGainControl: true };
  try {
    return await navigator.mediaDevices.getUserMedia({
      audio,
      video: { width: { ideal: 640 }, height: { ideal: 480 }, frameRate: { ideal: 15 } },
    });
  } catch (e) {
    // no camera (or refused): an audio-only call
    return await navigator.mediaDevices.getUserMedia({ audio });
  }
}

async function start() {
  clearError();
  $("start").disabled = true;
  setBadge("starting", "busy");
  try {
    localStream = await getMedia();
  } catch (e) {
    showError("microphone not available: " + e.message);
    setBadge("not connected", "idle");
    $("start").disabled = false;
    return;
  }
  const hasVideo = localStream.getVideoTracks().length > 0;
  $("preview").srcObject = hasVideo ? localStream : null;
  $("no-camera").hidden = hasVideo;
  const micLevel = levelMeter(localStream);
  let modelLevel = () => 0;

  if (token()) {
    // TURN credentials come only with the token
    try {
      iceServers = (await fetchInfo()).ice_servers || iceServers;
    } catch {
      // keep what the page loaded with
    }
  }
  pc = new RTCPeerConnection({ iceServers });
  for (const track of localStream.getTracks()) pc.addTrack(track, localStream);
  dc = pc.createDataChannel("omnicall");
  dc.onopen = () => {
    stats.dataChannelState = "open";
    $("message").disabled = $("send").disabled = $("interrupt").disabled = false;
  };
  dc.onclose = () => {
    stats.dataChannelState = "closed";
  };
  dc.onmessage = (e) => onMessage(e.data);
  pc.ontrack = (e) => {
    if (e.track.kind !== "audio") return;
    const stream = e.streams[0] || new MediaStream([e.track]);
    $("remote").srcObject = stream;
    $("remote").play().catch(() => {});
    modelLevel = levelMeter(stream);
  };
  pc.onconnectionstatechange = () => {
    stats.connectionState = pc.connectionState;
    const cls = { connected: "ok", failed: "bad", disconnected: "bad", closed: "idle" };
    setBadge(pc.connectionState, cls[pc.connectionState] || "busy");
    if (pc.connectionState === "failed") showError("the connection failed");
  };
  pc.oniceconnectionstatechange = () => {
    stats.iceConnectionState = pc.iceConnectionState;
  };

  try {
    await pc.setLocalDescription(await pc.createOffer());
    await waitForIce(pc, 3000);
    const query = new URLSearchParams({ voice: $("voice").value, reply_mode: $("reply-mode").value });
    const res = await fetch("v1/offer?" + query, {
      method: "POST",
      headers: authHeaders({ "Content-Type": "application/sdp" }),
      body: pc.localDescription.sdp,
    });
    const body = await res.text();
    if (res.status !== 201) throw new Error(`${res.status}: ${body.trim()}`);
    callUrl = res.headers.get("Location");
    await pc.setRemoteDescription({ type: "answer", sdp: body });
  } catch (e) {
    showError("call refused: " + e.message);
    stop();
    return;
  }

  $("hangup").disabled = false;
  meterTimer = setInterval(() => {
    stats.micLevel = micLevel();
    stats.maxMicLevel = Math.max(stats.maxMicLevel, stats.micLevel);
    stats.modelLevel = modelLevel();
    stats.maxModelLevel = Math.max(stats.maxModelLevel, stats.modelLevel);
    $("mic-level").value = Math.min(1, stats.micLevel * 4);
    $("model-level").value = Math.min(1, stats.modelLevel * 4);
    // the first sound of an answer, as heard here
    if (stats.modelLevel > 0.01) {
      for (const [n, t] of turns) {
        if (t.userTurnAt != null && t.heardAt == null) {
          t.heardAt = performance.now();
          renderLatency(n);
        }
      }
    }
  }, 50);
  statsTimer = setInterval(readStats, 500);
}

async function readStats() {
  if (!pc) return;
  const report = await pc.getStats();
  report.forEach((s) => {
    if (s.type === "inbound-rtp" && s.kind === "audio") {
      stats.audioPacketsReceived = s.packetsReceived || 0;
      stats.audioSamplesReceived = s.totalSamplesReceived || 0;
      stats.audioEnergy = s.totalAudioEnergy || 0;
      stats.audioLevel = s.audioLevel || 0;
    }
    if (s.type === "outbound-rtp" && s.kind === "video") {
      stats.videoFramesSent = s.framesSent || s.framesEncoded || 0;
      const codec = s.codecId && report.get(s.codecId);
      if (codec) stats.videoCodec = codec.mimeType;
    }
  });
}

function stop() {
  clearInterval(meterTimer);
  clearInterval(statsTimer);
  if (pc) pc.close();
  pc = null;
  dc = null;
  if (localStream) localStream.getTracks().forEach((t) => t.stop());
  localStream = null;
  $("preview").srcObject = null;
  stats.connectionState = "closed";
  setBadge("not connected", "idle");
  $("start").disabled = false;
  $("hangup").disabled = $("interrupt").disabled = true;
  $("message").disabled = $("send").disabled = true;
}

async function hangUp() {
  send({ type: "hangup" });
  const url = callUrl;
  callUrl = null;
  stop();
  if (url) {
    try {
      await fetch(url, { method: "DELETE", headers: authHeaders() });
    } catch {
      // the call ends on its own when the connection closes
    }
  }
}

$("start").addEventListener("click", start);
$("hangup").addEventListener("click", hangUp);
$("interrupt").addEventListener("click", () => send({ type: "interrupt" }));
$("voice").addEventListener("change", () => send({ type: "voice", voice: $("voice").value }));
$("reply-mode").addEventListener("change", () => send({ type: "reply_mode", mode: $("reply-mode").value }));
$("say").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("message").value.trim();
  if (!text) return;
  send({ type: "text", text });
  $("message").value = "";
});
window.addEventListener("pagehide", () => {
  // leaving the page: tell the server now rather than when the connection times out
  if (!callUrl) return;
  send({ type: "hangup" });
  fetch(callUrl, { method: "DELETE", headers: authHeaders(), keepalive: true }).catch(() => {});
  callUrl = null;
});
window.omnicall = { start, hangUp };
loadInfo();
