// s3_front.mjs — a local S3 for the tests: s3rver behind a front that verifies SigV4 and can
// inject faults on demand.
//
// s3rver 3.7 stores objects faithfully but never checks V4 signatures (a wrong secret gets 200)
// nor payload hashes, so it cannot tell a correctly signing client from a broken one.  This front
// runs s3rver in the same node process on an internal loopback port and forwards to it only what
// passes the checks real S3 makes:
//   * Authorization: AWS4-HMAC-SHA256 with a known access key, the scope's region/service, a date
//     within 15 minutes, and a signature recomputed (npm aws4) from the request as received — the
//     canonical path and query are rebuilt the way S3 does (decoded, RFC 3986 re-encoded, query
//     sorted), so a client that signs an unsorted or unencoded query fails as it would on AWS;
//   * host, x-amz-date, x-amz-content-sha256 and every x-amz-* header present must be signed;
//   * x-amz-content-sha256 must match the body (unless UNSIGNED-PAYLOAD);
//   * x-amz-security-token must match when the server was given one.
// Failures answer 403 SignatureDoesNotMatch / InvalidAccessKeyId / RequestTimeTooSkewed, 400
// XAmzContentSHA256Mismatch, with S3's XML error body.  Every response carries x-amz-request-id.
//
// Test control (unsigned, loopback only; the paths start with /__twn/):
//   POST /__twn/fault  {"kind": "500"|"503"|"403"|"reset"|"truncate"|"slow", "count": N,
//                       "match": "substring of the path" (optional), "method": "GET" (optional),
//                       "retry_after": "1" (503), "delay_ms": 3000 (slow)}
//                      queues a rule; each matching request uses up one of its count.
//                      500/503: an S3 error response (503 with Retry-After when given);
//                      403: AccessDenied, as S3 answers for a bucket of another account;
//                      reset: the connection is destroyed before any response byte;
//                      truncate: the headers and half the body, then the connection is destroyed;
//                      slow: the headers, then delay_ms of silence, then the body.
//   GET  /__twn/stats  {"requests", "forwarded", "connections", "bytes_out", "auth_failures",
//                       "faults", "last_request_id", "log": [{method, path, range, status, t0, t1}
//                       ...]}  (t0: ms since start when the request arrived, t1: when its
//                       response was finished; 0 while under way)
//   POST /__twn/reset  clears the stats and the fault rules.
//   POST /__twn/config {"token": "T"} requires x-amz-security-token T from now on ("" = none).
//
// Usage: node --openssl-legacy-provider s3_front.mjs --dir DIR --port-file FILE
//          [--port 0] [--key AK] [--secret SK] [--token T] [--region us-east-1]
//          [--parent-pid PID] [--max-seconds 600]
// (--openssl-legacy-provider: s3rver encrypts ListObjectsV2 continuation tokens with DES.)
// The port is written to --port-file once both servers listen.  The process exits by itself when
// --parent-pid is gone or after --max-seconds, so a crashed test never leaves it behind.
import crypto from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const require = createRequire(path.join(here, '../../tools/node/package.json'));
const S3rver = require('s3rver');
const { DUMMY_ACCOUNT } = require('s3rver/lib/models/account');
const aws4 = require('aws4');

const args = { port: '0', key: 'S3RVER', secret: 'S3RVER', token: '', region: 'us-east-1',
               'max-seconds': '600', 'parent-pid': '' };
for (let i = 2; i < process.argv.length; i += 2) {
  const k = process.argv[i].replace(/^--/, '');
  if (!(k in args) && k !== 'dir' && k !== 'port-file') {
    console.error(`s3_front: unknown option --${k}`);
    process.exit(2);
  }
  args[k] = process.argv[i + 1];
}
if (!args.dir || !args['port-file']) {
  console.error('s3_front: --dir and --port-file are required');
  process.exit(2);
}
DUMMY_ACCOUNT.createKeyPair(args.key, args.secret);

// ------------------------------------------------------------------------------------------------
// State

let faults = [];
const stats = () => ({ requests: 0, forwarded: 0, connections: 0, bytes_out: 0,
                       auth_failures: 0, faults: 0, last_request_id: '', log: [] });
let st = stats();
let reqCounter = 0;

const xmlEscape = s => String(s).replace(/[&<>"']/g,
  c => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&apos;' })[c]);

function s3Error(res, status, code, message, requestId, extra = {}, retryAfter = '') {
  let body = '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>' + code + '</Code><Message>' +
             xmlEscape(message) + '</Message>';
  for (const [k, v] of Object.entries(extra)) body += `<${k}>${xmlEscape(v)}</${k}>`;
  body += `<RequestId>${requestId}</RequestId></Error>`;
  const headers = { 'content-type': 'application/xml', 'content-length': Buffer.byteLength(body),
                    'x-amz-request-id': requestId };
  if (retryAfter) headers['retry-after'] = retryAfter;
  res.writeHead(status, headers);
  res.end(body);
  return status;
}

// ------------------------------------------------------------------------------------------------
// SigV4

const sha256hex = b => crypto.createHash('sha256').update(b).digest('hex');

function amzDateToMs(d) {
  const m = /^(\d{4})(\d{2})(\d{2})T(\d{2})(\d{2})(\d{2})Z$/.exec(d || '');
  return m ? Date.UTC(+m[1], +m[2] - 1, +m[3], +m[4], +m[5], +m[6]) : NaN;
}

// Returns null when the request is authentic, else [status, code, message, extra].
function verify(req, body) {
  const auth = req.headers.authorization || '';
  const m = /^AWS4-HMAC-SHA256 Credential=([^/,\s]+)\/(\d{8})\/([^/]+)\/([^/]+)\/aws4_request,\s*SignedHeaders=([a-z0-9;-]+),\s*Signature=([0-9a-f]{64})$/.exec(auth);
  if (!m) return [403, 'AccessDenied', 'missing or malformed AWS4-HMAC-SHA256 Authorization header'];
  const [, ak, day, region, service, signedList, sig] = m;
  if (ak !== args.key)
    return [403, 'InvalidAccessKeyId',
            'The AWS Access Key Id you provided does not exist in our records.',
            { AWSAccessKeyId: ak }];
  if (region !== args.region || service !== 's3')
    return [403, 'SignatureDoesNotMatch', `credential scope ${region}/${service}; expected ${args.region}/s3`];
  const date = req.headers['x-amz-date'];
  const t = amzDateToMs(date);
  if (!Number.isFinite(t) || date.slice(0, 8) !== day)
    return [403, 'AccessDenied', `x-amz-date '${date}' is missing or does not match the scope ${day}`];
  if (Math.abs(Date.now() - t) > 15 * 60 * 1000)
    return [403, 'RequestTimeTooSkewed',
            'The difference between the request time and the current time is too large.'];
  const signed = signedList.split(';');
  for (const h of ['host', 'x-amz-date', 'x-amz-content-sha256'])
    if (!signed.includes(h)) return [403, 'AccessDenied', `header '${h}' must be signed`];
  for (const h of Object.keys(req.headers))
    if (h.startsWith('x-amz-') && !signed.includes(h))
      return [403, 'AccessDenied', `header '${h}' is present but not signed`];
  if (args.token && req.headers['x-amz-security-token'] !== args.token)
    return [403, 'InvalidToken', 'The provided token is malformed or otherwise invalid.'];
  const headers = {};
  for (const h of signed) {
    if (!(h in req.headers)) return [403, 'AccessDenied', `signed header '${h}' is not present`];
    headers[h] = req.headers[h];
  }
  const signer = new aws4.RequestSigner(
    { method: req.method, host: req.headers.host, path: req.url, headers, service: 's3', region,
      doNotModifyHeaders: true },
    { accessKeyId: args.key, secretAccessKey: args.secret });
  signer.datetime = date; // doNotModifyHeaders keeps aws4 from reading it: it would use "now"
  if (signer.signedHeaders() !== signedList)
    return [403, 'SignatureDoesNotMatch',
            `SignedHeaders '${signedList}' names headers S3 does not sign; expected '${signer.signedHeaders()}'`];
  const expect = signer.signature();
  if (expect !== sig)
    return [403, 'SignatureDoesNotMatch',
            'The request signature we calculated does not match the signature you provided. ' +
            'Check your key and signing method.',
            { StringToSign: signer.stringToSign(), CanonicalRequest: signer.canonicalString() }];
  const declared = req.headers['x-amz-content-sha256'];
  if (declared !== 'UNSIGNED-PAYLOAD' && declared !== sha256hex(body))
    return [400, 'XAmzContentSHA256Mismatch',
            "The provided 'x-amz-content-sha256' header does not match what was computed.",
            { ClientComputedContentSHA256: declared, S3ComputedContentSHA256: sha256hex(body) }];
  return null;
}

// ------------------------------------------------------------------------------------------------
// Faults

function takeFault(req) {
  for (const f of faults) {
    if (f.count <= 0) continue;
    if (f.match && !req.url.includes(f.match)) continue;
    if (f.method && f.method !== req.method) continue;
    f.count--;
    return f;
  }
  return null;
}

// ------------------------------------------------------------------------------------------------
// Servers

const s3 = new S3rver({ address: '127.0.0.1', port: 0, silent: true, directory: args.dir,
                        vhostBuckets: false });
const { port: backPort } = await s3.run();
const agent = new http.Agent({ keepAlive: true, maxSockets: 64 });

function admin(req, res, body) {
  const reply = (obj, status = 200) => {
    const b = JSON.stringify(obj);
    res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(b) });
    res.end(b);
  };
  if (req.url === '/__twn/stats') return reply(st);
  if (req.url === '/__twn/reset' && req.method === 'POST') {
    st = stats();
    faults = [];
    return reply({ ok: true });
  }
  if (req.url === '/__twn/config' && req.method === 'POST') {
    try {
      const c = JSON.parse(body.toString() || '{}');
      if ('token' in c) args.token = String(c.token);
      return reply({ ok: true });
    } catch (e) {
      return reply({ error: String(e) }, 400);
    }
  }
  if (req.url === '/__twn/fault' && req.method === 'POST') {
    try {
      const f = JSON.parse(body.toString() || '{}');
      if (!['500', '503', '403', 'reset', 'truncate', 'slow'].includes(String(f.kind)))
        return reply({ error: `unknown fault kind '${f.kind}'` }, 400);
      faults.push({ kind: String(f.kind), count: f.count ?? 1, match: f.match || '',
                    method: f.method || '', retry_after: f.retry_after ? String(f.retry_after) : '',
                    delay_ms: f.delay_ms ?? 3000 });
      return reply({ ok: true });
    } catch (e) {
      return reply({ error: String(e) }, 400);
    }
  }
  return reply({ error: `unknown control path ${req.url}` }, 404);
}

function forward(req, res, body, requestId, fault) {
  const headers = { ...req.headers };
  delete headers.connection;
  // s3rver 3.7 reads "bytes=0-0" as "bytes=0-" (its `end || Infinity`); real S3 sends one byte.
  const oneByte = req.method === 'GET' && headers.range === 'bytes=0-0';
  if (oneByte) headers.range = 'bytes=0-1';
  const up = http.request({ host: '127.0.0.1', port: backPort, method: req.method, path: req.url,
                            headers, agent }, upRes => {
    const chunks = [];
    upRes.on('data', c => chunks.push(c));
    upRes.on('end', () => {
      let data = Buffer.concat(chunks);
      const out = { ...upRes.headers, 'x-amz-request-id': requestId };
      if (oneByte && upRes.statusCode === 206) {
        data = data.subarray(0, 1);
        out['content-range'] = out['content-range'].replace(/^bytes 0-\d+/, 'bytes 0-0');
      }
      delete out.connection;
      delete out['transfer-encoding'];
      if (req.method !== 'HEAD') out['content-length'] = data.length;
      st.forwarded++;
      st.log[st.log.length - 1].status = upRes.statusCode;
      if (fault && fault.kind === 'truncate' && data.length > 1) {
        res.writeHead(upRes.statusCode, out);
        res.write(data.subarray(0, data.length >> 1), () => res.socket.destroy());
        st.bytes_out += data.length >> 1;
        return;
      }
      if (fault && fault.kind === 'slow') {
        res.writeHead(upRes.statusCode, out);
        res.flushHeaders();
        setTimeout(() => {
          if (res.destroyed || res.socket?.destroyed) return;
          st.bytes_out += data.length;
          res.end(req.method === 'HEAD' ? undefined : data);
        }, fault.delay_ms);
        return;
      }
      st.bytes_out += req.method === 'HEAD' ? 0 : data.length;
      res.writeHead(upRes.statusCode, out);
      res.end(req.method === 'HEAD' ? undefined : data);
    });
  });
  up.on('error', e => s3Error(res, 502, 'InternalError', `s3rver: ${e.message}`, requestId));
  up.end(body);
}

const front = http.createServer((req, res) => {
  const chunks = [];
  req.on('data', c => chunks.push(c));
  req.on('end', () => {
    const body = Buffer.concat(chunks);
    if (req.url.startsWith('/__twn/')) return admin(req, res, body);
    const requestId = 'TWN' + (++reqCounter).toString(16).toUpperCase().padStart(13, '0');
    st.requests++;
    st.last_request_id = requestId;
    const entry = { method: req.method, path: req.url, range: req.headers.range || '', status: 0,
                    id: requestId, t0: performance.now(), t1: 0 };
    res.on('close', () => { entry.t1 = performance.now(); });
    st.log.push(entry);
    if (st.log.length > 5000) st.log.shift();
    const bad = verify(req, body);
    if (bad) {
      st.auth_failures++;
      console.error(`s3_front: ${requestId} ${req.method} ${req.url}: ${bad[1]}: ${bad[2]}` +
                    (bad[3]?.CanonicalRequest ? `\n--- canonical request:\n${bad[3].CanonicalRequest}\n--- headers: ${JSON.stringify(req.headers)}` : ''));
      entry.status = s3Error(res, bad[0], bad[1], bad[2], requestId, bad[3] || {});
      return;
    }
    const fault = takeFault(req);
    if (fault) {
      st.faults++;
      if (fault.kind === 'reset') return req.socket.destroy();
      if (fault.kind === '500')
        return void (entry.status = s3Error(res, 500, 'InternalError',
                                            'We encountered an internal error. Please try again.',
                                            requestId));
      if (fault.kind === '403')
        return void (entry.status = s3Error(res, 403, 'AccessDenied', 'Access Denied', requestId));
      if (fault.kind === '503')
        return void (entry.status = s3Error(res, 503, 'SlowDown', 'Please reduce your request rate.',
                                            requestId, {}, fault.retry_after));
    }
    forward(req, res, body, requestId, fault);
  });
});
front.on('connection', () => st.connections++);
front.keepAliveTimeout = 30000;
front.listen(Number(args.port), '127.0.0.1', () => {
  const tmp = args['port-file'] + '.tmp';
  fs.writeFileSync(tmp, String(front.address().port) + '\n');
  fs.renameSync(tmp, args['port-file']);
});

// ------------------------------------------------------------------------------------------------
// Lifetime

const stop = () => process.exit(0);
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
setTimeout(stop, Number(args['max-seconds']) * 1000).unref();
if (args['parent-pid']) {
  const ppid = Number(args['parent-pid']);
  setInterval(() => {
    try {
      process.kill(ppid, 0);
    } catch {
      stop();
    }
  }, 500).unref();
}
