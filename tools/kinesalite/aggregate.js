// Aggregates records the way the Kinesis Producer Library does, with AWS's own
// aws-kinesis-agg library: a JSON array of {"partitionKey", "data"} on stdin, one
// aggregated Kinesis record per line on stdout as {"partitionKey", "data_base64"}.
const { aggregate } = require('aws-kinesis-agg');

let input = '';
process.stdin.on('data', (chunk) => (input += chunk));
process.stdin.on('end', () => {
  const records = JSON.parse(input).map((r) => ({
    partitionKey: r.partitionKey,
    data: Buffer.from(r.data),
  }));
  aggregate(
    records,
    (encoded, done) => {
      process.stdout.write(
        JSON.stringify({ partitionKey: encoded.partitionKey, data_base64: Buffer.from(encoded.data).toString('base64') }) + '\n',
      );
      done();
    },
    () => {},
    (err) => {
      console.error(`aggregation failed: ${err}`);
      process.exit(1);
    },
  );
});
