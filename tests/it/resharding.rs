//! Resharding while the daemon runs: nothing is lost, and a partition key's records in the
//! parent shard are handled before those in its child.

use std::time::Duration;

use crate::support::*;

/// Deletion requests for one partition key (users `ord-N`) with unrelated traffic and
/// requests on other keys (users `other-N`) between them.
fn phase(
    ordered: std::ops::Range<usize>,
    others: std::ops::Range<usize>,
) -> Vec<(String, Vec<u8>)> {
    let mut records = Vec::new();
    let mut others = others.into_iter();
    for n in ordered {
        records.push((
            "one-user-key".to_owned(),
            deletion(&format!("ord-{n}"), &format!("ord-{n}"))
                .to_string()
                .into_bytes(),
        ));
        records.push(unrelated_event(n * 3));
        records.push(unrelated_event(n * 3 + 1));
        if let Some(m) = others.next() {
            records.push((
                format!("key-{m}"),
                deletion(&format!("other-{m}"), &format!("other-{m}"))
                    .to_string()
                    .into_bytes(),
            ));
        }
    }
    records
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_loses_nothing_and_keeps_key_order() {
    let kinesis = Kinesalite::start();
    let client = kinesis.client();
    create_stream(&client, "events", 1).await;
    // Slow enough that the parent still has unhandled records when the split happens.
    let backend = Backend::with_behaviour(Duration::from_millis(15), |_, _| 200).await;
    let ws = Workspace::new(&kinesis.endpoint, "events", &backend.url);
    put(&client, "events", &phase(0..100, 0..50)).await;
    let daemon = ws.start_daemon(&[]);
    wait_until(
        Duration::from_secs(60),
        "the daemon to start handling",
        || backend.count() >= 10,
    )
    .await;

    split_in_half(&client, "events", "shardId-000000000000").await;
    wait_active(&client, "events").await;
    assert!(
        backend.count() < 150,
        "the parent was drained before the split; nothing tested"
    );
    put(&client, "events", &phase(100..200, 50..100)).await;

    wait_until(Duration::from_secs(120), "all 300 requests", || {
        backend.count() >= 300
    })
    .await;
    let log = daemon.stderr();
    assert!(daemon.stop().success());

    let received = backend.received();
    assert_eq!(received.len(), 300, "some request was sent twice");
    let user = |path: &str| {
        path.strip_prefix("/v1/users/")
            .and_then(|p| p.strip_suffix("/anonymize"))
            .unwrap()
            .to_owned()
    };
    let ordered: Vec<usize> = received
        .iter()
        .filter_map(|r| {
            user(&r.path)
                .strip_prefix("ord-")
                .map(|n| n.parse().unwrap())
        })
        .collect();
    assert_eq!(
        ordered,
        (0..200).collect::<Vec<_>>(),
        "one key's requests out of order or lost"
    );
    let mut others: Vec<usize> = received
        .iter()
        .filter_map(|r| {
            user(&r.path)
                .strip_prefix("other-")
                .map(|n| n.parse().unwrap())
        })
        .collect();
    others.sort();
    assert_eq!(others, (0..100).collect::<Vec<_>>());
    assert!(log.contains("shard read to its end"), "{log}");
    // The children were read: two new shards started after the parent.
    assert!(
        log.contains("shardId-000000000001") && log.contains("shardId-000000000002"),
        "{log}"
    );
}
