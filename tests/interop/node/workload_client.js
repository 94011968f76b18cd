// The Node side of the Workload API interop matrix: @grpc/grpc-js (gRPC in pure
// JavaScript) with @grpc/proto-loader reading proto/spiffe/workload.proto. Commands come on
// stdin, one JSON line per command goes to stdout with what the client itself decoded;
// tests/interop/README.md lists them.
'use strict';

const path = require('path');
const readline = require('readline');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_ROOT = path.resolve(__dirname, '..', '..', '..', 'proto');

function loadService() {
  const definition = protoLoader.loadSync('spiffe/workload.proto', {
    includeDirs: [PROTO_ROOT],
    keepCase: true,
    longs: String,
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).SpiffeWorkloadAPI;
}

function header() {
  const metadata = new grpc.Metadata();
  metadata.set('workload.spiffe.io', 'true');
  return metadata;
}

function codeName(code) {
  return Object.keys(grpc.status).find((name) => grpc.status[name] === code) || String(code);
}

function failure(err) {
  return { ok: false, code: codeName(err.code), message: err.details || err.message };
}

function x509Message(response) {
  return {
    ok: true,
    svids: response.svids.map((svid) => ({
      spiffe_id: svid.spiffe_id,
      chain_bytes: svid.x509_svid.length,
      key_bytes: svid.x509_svid_key.length,
      bundle_bytes: svid.bundle.length,
    })),
  };
}

// The first message of a server stream, or its error; the stream stays open for more.
class StreamReader {
  constructor(call) {
    this.call = call;
    this.queue = [];
    this.waiting = [];
    const push = (item) => {
      const waiter = this.waiting.shift();
      if (waiter) waiter(item);
      else this.queue.push(item);
    };
    call.on('data', (message) => push({ message }));
    call.on('error', (error) => push({ error }));
    call.on('end', () => push({ end: true }));
  }

  next() {
    const item = this.queue.shift();
    if (item) return Promise.resolve(item);
    return new Promise((resolve) => this.waiting.push(resolve));
  }
}

async function first(call, describe) {
  const reader = new StreamReader(call);
  const item = await reader.next();
  call.cancel();
  return answerOf(item, describe);
}

function answerOf(item, describe) {
  if (item.error) return failure(item.error);
  if (item.end) return { ok: false, code: 'EOF', message: 'the stream ended' };
  return describe(item.message);
}

function unary(client, method, request) {
  return new Promise((resolve) => {
    client[method](request, header(), (err, response) => resolve({ err, response }));
  });
}

// google.protobuf.Struct as proto-loader hands it over, back to plain JSON.
function plain(value) {
  if (value === null || value === undefined) return null;
  switch (value.kind) {
    case 'stringValue': return value.stringValue;
    case 'numberValue': return value.numberValue;
    case 'boolValue': return value.boolValue;
    case 'listValue': return value.listValue.values.map(plain);
    case 'structValue': return structToJson(value.structValue);
    default: return null;
  }
}

function structToJson(struct) {
  const out = {};
  for (const [key, value] of Object.entries(struct.fields || {})) out[key] = plain(value);
  return out;
}

async function run(client, words, state) {
  const [command, ...args] = words;
  switch (command) {
    case 'x509_open': {
      state.x509 = new StreamReader(client.FetchX509SVID({}, header()));
      return answerOf(await state.x509.next(), x509Message);
    }
    case 'x509_next':
      return answerOf(await state.x509.next(), x509Message);
    case 'x509_bundles':
      return first(client.FetchX509Bundles({}, header()), (m) => {
        const bundles = {};
        for (const [td, der] of Object.entries(m.bundles)) bundles[td] = der.length;
        return { ok: true, bundles };
      });
    case 'jwt': {
      const { err, response } = await unary(client, 'FetchJWTSVID', {
        audience: [args[0]],
        spiffe_id: args[1] || '',
      });
      if (err) return failure(err);
      return {
        ok: true,
        svids: response.svids.map((s) => ({ spiffe_id: s.spiffe_id, token: s.svid })),
      };
    }
    case 'validate': {
      const { err, response } = await unary(client, 'ValidateJWTSVID', {
        audience: args[0],
        svid: args[1],
      });
      if (err) return failure(err);
      const claims = structToJson(response.claims || {});
      return {
        ok: true,
        spiffe_id: response.spiffe_id,
        aud: Array.isArray(claims.aud) ? claims.aud : [claims.aud],
      };
    }
    case 'jwt_bundles':
      return first(client.FetchJWTBundles({}, header()), (m) => {
        const bundles = {};
        for (const [td, jwks] of Object.entries(m.bundles)) {
          bundles[td] = (JSON.parse(Buffer.from(jwks).toString('utf8')).keys || []).length;
        }
        return { ok: true, bundles };
      });
    case 'noheader':
      return first(client.FetchX509SVID({}, new grpc.Metadata()), x509Message);
    default:
      return { ok: false, code: 'CLIENT', message: `unknown command ${command}` };
  }
}

async function main() {
  const endpoint = process.env.SPIFFE_ENDPOINT_SOCKET;
  const Service = loadService();
  const runAs = process.env.INTEROP_RUN_AS_UID;
  if (runAs) {
    // The stack is loaded; from here on the agent must see a caller of this uid.
    process.setgroups([]);
    process.setgid(Number(runAs));
    process.setuid(Number(runAs));
  }
  // grpc-js takes unix:///absolute/path as it is.
  const client = new Service(endpoint, grpc.credentials.createInsecure());
  const state = {};
  const lines = readline.createInterface({ input: process.stdin });
  for await (const line of lines) {
    const words = line.trim().split(/\s+/).filter(Boolean);
    if (words.length === 0) continue;
    if (words[0] === 'quit') break;
    const answer = await run(client, words, state);
    process.stdout.write(`${JSON.stringify(answer)}\n`);
  }
  if (state.x509) state.x509.call.cancel();
  client.close();
}

main().catch((err) => {
  process.stderr.write(`${err.stack || err}\n`);
  process.exit(1);
});
