//! `capture`: saves records from the stream as JSON lines (the format of `preview --input`
//! and of test cases), so rules can be tried offline. Reads from a start position on its own
//! cursor, touches no state, and ends when every shard is caught up or at a limit.

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::decode::{self, RecordJson};
use crate::pipeline::PipelineError;
use crate::shutdown::Shutdown;
use crate::source::{Checkpoint, Position, ShardReader};
use crate::state::StateError;
use crate::supervisor::{ShardExit, ShardWork};

pub struct Capture<W> {
    stream: String,
    out: Mutex<W>,
    limit: Option<u64>,
    written: AtomicU64,
    checkpoints: Mutex<HashMap<String, Checkpoint>>,
    shutdown: Shutdown,
}

impl<W: Write + Send + 'static> Capture<W> {
    pub fn new(stream: String, out: W, limit: Option<u64>, shutdown: Shutdown) -> Self {
        Self {
            stream,
            out: Mutex::new(out),
            limit,
            written: AtomicU64::new(0),
            checkpoints: Mutex::default(),
            shutdown,
        }
    }

    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    pub fn into_inner(self) -> W {
        self.out.into_inner().unwrap()
    }

    /// Writes one record; false once the limit is reached.
    fn write(&self, record: &RecordJson) -> bool {
        let n = self.written.fetch_add(1, Ordering::Relaxed);
        if self.limit.is_some_and(|limit| n >= limit) {
            self.written.fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        let mut line = serde_json::to_vec(record).expect("a record serializes");
        line.push(b'\n');
        let _ = self.out.lock().unwrap().write_all(&line);
        true
    }
}

impl<W: Write + Send + 'static> ShardWork for Capture<W> {
    fn checkpoints(&self) -> Result<std::collections::HashMap<String, Checkpoint>, StateError> {
        Ok(self
            .checkpoints
            .lock()
            .unwrap()
            .clone()
            .into_iter()
            .collect())
    }

    async fn run_shard(
        self: Arc<Self>,
        mut reader: ShardReader,
        shard_id: String,
        _start: Position,
        _stop: Shutdown,
    ) -> Result<ShardExit, PipelineError> {
        let (stream, shard): (Arc<str>, Arc<str>) =
            (self.stream.as_str().into(), shard_id.as_str().into());
        loop {
            let Some(batch) = reader.next(&self.shutdown).await? else {
                return Ok(ShardExit::Stopped);
            };
            let empty = batch.records.is_empty();
            let mut last = None;
            for raw in batch.records {
                last = Some(raw.sequence_number.to_string());
                // A record that does not decode is captured as it is.
                let records = decode::decode(&stream, &shard, raw).unwrap_or_else(|undecodable| {
                    smallvec::smallvec![decode::Record::undecoded(&stream, &shard, undecodable.raw)]
                });
                for record in records {
                    if !self.write(&RecordJson::from_record(&record)) {
                        self.shutdown.trigger();
                        return Ok(ShardExit::Stopped);
                    }
                }
            }
            if batch.shard_end {
                self.checkpoints
                    .lock()
                    .unwrap()
                    .insert(shard_id, Checkpoint::end(last));
                return Ok(ShardExit::Finished);
            }
            if empty && batch.millis_behind_latest == Some(0) {
                return Ok(ShardExit::CaughtUp);
            }
        }
    }

    fn shutdown(&self) -> &Shutdown {
        &self.shutdown
    }

    fn ends_when_caught_up(&self) -> bool {
        true
    }
}
