// End-to-end encryption of media frames: key agreement and the safety code.
//
// Each party makes a fresh ECDH P-256 key pair for the call (the private key is not
// extractable) and sends only its public key, in a `call.signal` message relayed by
// signaling. Both derive the same shared secret, and from it with HKDF-SHA-256 (salt: the
// call id) one AES-GCM-256 key per direction. The frame keys are not extractable either:
// nothing in the page can read or send them; they go only to this call's worker.
//
// The safety code is a hash of the call id and both public keys: the same digits on both
// screens mean nobody in between (signaling, the SFU) swapped the keys.

const enc = new TextEncoder();

export function toBase64(bytes) {
  let s = "";
  for (const b of new Uint8Array(bytes)) s += String.fromCharCode(b);
  return btoa(s);
}

export function fromBase64(text) {
  const s = atob(text);
  const out = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
  return out;
}

export class KeyAgreement {
  static async create() {
    const self = new KeyAgreement();
    self.keyPair = await crypto.subtle.generateKey(
      { name: "ECDH", namedCurve: "P-256" }, false, ["deriveBits"],
    );
    self.publicRaw = new Uint8Array(await crypto.subtle.exportKey("raw", self.keyPair.publicKey));
    return self;
  }

  get publicKey() { return toBase64(this.publicRaw); }

  // The ECDH secret shared with the holder of ``peerRaw`` (an uncompressed P-256 point; any
  // other bytes are refused), as an HKDF key to derive the call's keys from.
  async sharedSecret(peerRaw) {
    if (peerRaw.length !== 65 || peerRaw[0] !== 4) throw new Error("bad peer public key");
    const peerKey = await crypto.subtle.importKey(
      "raw", peerRaw, { name: "ECDH", namedCurve: "P-256" }, false, [],
    );
    const secret = await crypto.subtle.deriveBits(
      { name: "ECDH", public: peerKey }, this.keyPair.privateKey, 256,
    );
    return crypto.subtle.importKey("raw", secret, "HKDF", false, ["deriveKey"]);
  }

  // -> {sendKey, receiveKey, safetyCode}; role is "caller" or "callee".
  async derive(peerPublicBase64, callId, role) {
    const peerRaw = fromBase64(peerPublicBase64);
    const hkdf = await this.sharedSecret(peerRaw);
    const direction = async (label, usage) => crypto.subtle.deriveKey(
      { name: "HKDF", hash: "SHA-256", salt: enc.encode(callId), info: enc.encode(`dmcall e2ee v1 ${label}`) },
      hkdf, { name: "AES-GCM", length: 256 }, false, [usage],
    );
    const mine = role === "caller" ? "caller->callee" : "callee->caller";
    const theirs = role === "caller" ? "callee->caller" : "caller->callee";
    const callerRaw = role === "caller" ? this.publicRaw : peerRaw;
    const calleeRaw = role === "caller" ? peerRaw : this.publicRaw;
    return {
      sendKey: await direction(mine, "encrypt"),
      receiveKey: await direction(theirs, "decrypt"),
      safetyCode: await safetyCode(callId, callerRaw, calleeRaw),
    };
  }
}

// 12 digits in three groups ("4821 0937 5512"), about 40 bits.
export async function safetyCode(callId, callerRaw, calleeRaw) {
  const input = new Uint8Array([
    ...enc.encode(`dmcall-safety-code-v1|${callId}|`), ...callerRaw, ...calleeRaw,
  ]);
  return twelveDigits(input);
}

// SHA-256 of ``input`` as 12 digits in three groups of four.
async function twelveDigits(input) {
  const digest = new DataView(await crypto.subtle.digest("SHA-256", input));
  return [0, 4, 8].map((offset) => String(digest.getUint32(offset) % 10000).padStart(4, "0")).join(" ");
}

// ------------------------------------------------------------------ group calls
//
// A group call has one ECDH key pair per participant (per call session), exchanged pairwise:
// each pair derives its own wrapping key. Each participant encrypts its frames with its
// own *sender key* (AES-GCM-256, random), which it sends to every other participant wrapped
// under that pair's wrapping key; a new sender key on every join and leave. Receivers pick
// the key by the key id each frame carries (docs/web-client.md, "Group calls").

export const GROUP_WRAP_INFO = "dmcall e2ee group v1 wrap";

// The pair's wrapping key: HKDF-SHA-256 of the ECDH secret, salt = the call id. The same
// key both ways (each wrap has its own random IV, and the additional data names who sent it
// to whom), not extractable.
export async function pairWrapKey(agreement, peerPublicBase64, callId) {
  const hkdf = await agreement.sharedSecret(fromBase64(peerPublicBase64));
  return crypto.subtle.deriveKey(
    { name: "HKDF", hash: "SHA-256", salt: enc.encode(callId), info: enc.encode(GROUP_WRAP_INFO) },
    hkdf, { name: "AES-GCM", length: 256 }, false, ["encrypt", "decrypt"],
  );
}

function wrapAad(callId, from, to, keyId) {
  return enc.encode(`dmcall-group-key-v1|${callId}|${from}|${to}|${keyId}`);
}

// One sender key: its id (32 bits, random), the non-extractable key the worker encrypts
// with, and the raw bytes (kept only until the next rotation, to wrap for the participants
// it was made for whose public key comes late).
export class SenderKey {
  static async create(recipients) {
    const self = new SenderKey();
    self.keyId = crypto.getRandomValues(new Uint32Array(1))[0];
    self.raw = crypto.getRandomValues(new Uint8Array(32));
    self.key = await crypto.subtle.importKey("raw", self.raw, "AES-GCM", false, ["encrypt"]);
    self.recipients = new Set(recipients); // the participants joined when it was made
    return self;
  }

  async wrapFor(wrapKey, callId, from, to) {
    const iv = crypto.getRandomValues(new Uint8Array(12));
    const sealed = await crypto.subtle.encrypt(
      { name: "AES-GCM", iv, additionalData: wrapAad(callId, from, to, this.keyId) }, wrapKey, this.raw,
    );
    return { key_id: this.keyId, iv: toBase64(iv), wrapped: toBase64(sealed) };
  }

  forget() { this.raw.fill(0); }
}

// A sender key received from ``from`` (wrapped for ``to``, us) -> a non-extractable
// decrypt-only AES-GCM key; throws if it was not wrapped by that pair for us.
export async function unwrapSenderKey(wrapKey, callId, from, to, message) {
  const keyId = message.key_id;
  if (!Number.isInteger(keyId) || keyId < 0 || keyId > 0xffffffff) throw new Error("bad key id");
  const raw = new Uint8Array(await crypto.subtle.decrypt(
    { name: "AES-GCM", iv: fromBase64(message.iv), additionalData: wrapAad(callId, from, to, keyId) },
    wrapKey, fromBase64(message.wrapped),
  ));
  if (raw.length !== 32) throw new Error("bad sender key");
  const key = await crypto.subtle.importKey("raw", raw, "AES-GCM", false, ["decrypt"]);
  raw.fill(0);
  return { keyId, key };
}

// A participant's fingerprint: SHA-256("dmcall-fingerprint-v1|" + call id + "|" + user + "|"
// + ECDH public key), 12 digits in three groups. Every screen shows the same digits for the
// same participant unless someone in between swapped that participant's key.
export async function fingerprint(callId, user, publicRaw) {
  const input = new Uint8Array([...enc.encode(`dmcall-fingerprint-v1|${callId}|${user}|`), ...publicRaw]);
  return twelveDigits(input);
}
