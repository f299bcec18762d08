// Starts dynalite on 127.0.0.1 only, tables ACTIVE at once (in memory).
// DYNALITE_PORT=0 picks a free port; the chosen port is printed as "listening <port>".
const dynalite = require('dynalite');
const port = Number(process.env.DYNALITE_PORT || 8000);
const server = dynalite({ createTableMs: 0, deleteTableMs: 0, updateTableMs: 0 });
server.listen(port, '127.0.0.1', () => {
  console.log(`listening ${server.address().port}`);
});
