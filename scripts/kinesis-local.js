// Calls one Kinesis API action on a local emulator (kinesalite, kinesis-mock), for machines
// without the AWS CLI. Node 18+ only, no packages:
//   node scripts/kinesis-local.js CreateStream '{"StreamName":"client-events","ShardCount":1}'
// KINESIS_URL picks the endpoint (default http://127.0.0.1:4567). Emulators want a signed-
// looking request but check no signature, so the Authorization header is a fixed dummy.
// Prints the HTTP status and the answer; exits 1 unless the status is 2xx.
const [action, body] = process.argv.slice(2);
if (!action) {
  console.error('usage: node scripts/kinesis-local.js ACTION [JSON-BODY]');
  process.exit(2);
}
fetch(process.env.KINESIS_URL || 'http://127.0.0.1:4567', {
  method: 'POST',
  headers: {
    'Content-Type': 'application/x-amz-json-1.1',
    'X-Amz-Target': `Kinesis_20131202.${action}`,
    'Authorization': 'AWS4-HMAC-SHA256 Credential=local/20260101/us-east-1/kinesis/aws4_request, SignedHeaders=host, Signature=0',
    'X-Amz-Date': '20260101T000000Z',
  },
  body: body || '{}',
}).then(async (r) => {
  console.log(r.status, await r.text());
  process.exitCode = r.ok ? 0 : 1;
}, (e) => {
  console.error(`cannot reach ${process.env.KINESIS_URL || 'http://127.0.0.1:4567'}: ${e.cause?.message || e.message}`);
  process.exitCode = 1;
});
