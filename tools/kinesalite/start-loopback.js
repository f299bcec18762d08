// Starts kinesalite on 127.0.0.1 only (its CLI binds every interface).
// KINESALITE_PORT=0 picks a free port; the chosen port is printed as "listening <port>".
const kinesalite = require('kinesalite');
const port = Number(process.env.KINESALITE_PORT || 4567);
const server = kinesalite({ createStreamMs: 0, deleteStreamMs: 0, updateStreamMs: 0, shardLimit: 1000 });
server.listen(port, '127.0.0.1', () => {
  console.log(`listening ${server.address().port}`);
});
