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

  // -> {sendKey, receiveKey, safetyCode}; role is "caller" or "callee".
  async derive(peerPublicBase64, callId, role) {
    const peerRaw = fromBase64(peerPublicBase64);
    if (peerRaw.length !== 65 || peerRaw[0] !== 4) throw new Error("bad peer public key");
    const peerKey = await crypto.subtle.importKey(
      "raw", peerRaw, { name: "ECDH", namedCurve: "P-256" }, false, [],
    );
    const secret = await crypto.subtle.deriveBits(
      { name: "ECDH", public: peerKey }, this.keyPair.privateKey, 256,
    );
    const hkdf = await crypto.subtle.importKey("raw", secret, "HKDF", false, ["deriveKey"]);
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
  const digest = new DataView(await crypto.subtle.digest("SHA-256", input));
  const groups = [0, 4, 8].map((offset) => String(digest.getUint32(offset) % 10000).padStart(4, "0"));
  return groups.join(" ");
}
