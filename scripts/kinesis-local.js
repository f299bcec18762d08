// Calls one Kinesis API action on a local emulator: node kinesis.js ACTION '{json}'
const [action, body] = process.argv.slice(2);
fetch(process.env.KINESIS_URL || 'http://127.0.0.1:4567', {
  method: 'POST',
  headers: {
    'Content-Type': 'application/x-amz-json-1.1',
    'X-Amz-Target': `Kinesis_20131202.${action}`,
    'Authorization': 'AWS4-HMAC-SHA256 Credential=local/20260101/us-east-1/kinesis/aws4_request, SignedHeaders=host, Signature=0',
    'X-Amz-Date': '20260101T000000Z',
  },
  body: body || '{}',
}).then(async r => { console.log(r.status, await r.text()); process.exitCode = r.ok ? 0 : 1; });
