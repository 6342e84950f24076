//! A sink's queues: one per lane, bounded by the records they hold, and moving records in
//! batches. The router hands over all the records one batch of messages made for a lane
//! at once ([`SinkQueue::send_all`]), and the lane's driver takes whatever is queued at
//! once ([`LaneQueue::take`]): one channel operation and one wake-up per batch, not per
//! record.
//!
//! The bound is a semaphore with a permit per record of room. A sender takes as many
//! permits as it queues records (waiting while there is not room: backpressure); the
//! driver gives them back as it takes records out. A batch larger than the lane's whole
//! room goes in parts. A lane that ends closes its semaphore, so senders waiting for room
//! are told it has gone rather than waiting for good.

use std::collections::VecDeque;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Weak};

use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;

use super::Delivery;
use crate::health::Status;

/// The way into a running sink: its lanes' bounded queues.
#[derive(Clone)]
pub struct SinkQueue {
    lanes: Arc<[Lane]>,
    health: Status,
}

/// The sending side of one lane.
struct Lane {
    tx: mpsc::UnboundedSender<Vec<Delivery>>,
    room: Arc<Semaphore>,
    capacity: usize,
}

/// The receiving side of one lane, held by its driver.
pub struct LaneQueue {
    rx: mpsc::UnboundedReceiver<Vec<Delivery>>,
    room: Arc<Semaphore>,
    /// Records received but not yet taken (a batch that did not fit all at once).
    carry: VecDeque<Delivery>,
}

/// Opens `lanes` lanes with room for `capacity` records each; the sink's drivers take
/// the receiving ends.
pub fn open(lanes: usize, capacity: usize, health: Status) -> (SinkQueue, Vec<LaneQueue>) {
    let capacity = capacity.clamp(1, u32::MAX as usize);
    let (senders, receivers) = (0..lanes.max(1))
        .map(|_| {
            let (tx, rx) = mpsc::unbounded_channel();
            let room = Arc::new(Semaphore::new(capacity));
            let lane = Lane {
                tx,
                room: Arc::clone(&room),
                capacity,
            };
            let queue = LaneQueue {
                rx,
                room,
                carry: VecDeque::new(),
            };
            (lane, queue)
        })
        .unzip::<_, _, Vec<_>, Vec<_>>();
    let queue = SinkQueue {
        lanes: senders.into(),
        health,
    };
    (queue, receivers)
}

impl SinkQueue {
    /// A probe of this sink's queue depth, for the admin API and metrics.
    pub fn probe(&self) -> QueueProbe {
        QueueProbe {
            lanes: self
                .lanes
                .iter()
                .map(|l| (Arc::downgrade(&l.room), l.capacity))
                .collect(),
        }
    }

    /// The sink's health (see [`driver`](super::driver)).
    pub fn health(&self) -> &Status {
        &self.health
    }

    /// Queues a record on its topic's lane, waiting while the lane is full. Gives the
    /// record back when the sink has stopped.
    pub async fn send(&self, d: Delivery) -> Result<(), Delivery> {
        self.send_all(vec![d])
            .await
            .map_err(|mut unsent| unsent.pop().expect("the one record"))
    }

    /// Queues records, each on its topic's lane, in order (so each topic's records stay
    /// in order), waiting while a lane is full (backpressure). Gives back what was not
    /// queued when the sink has stopped.
    pub async fn send_all(&self, records: Vec<Delivery>) -> Result<(), Vec<Delivery>> {
        if let [lane] = &*self.lanes {
            return lane.send(records).await;
        }
        let mut by_lane: Vec<Vec<Delivery>> = self.lanes.iter().map(|_| Vec::new()).collect();
        for d in records {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            d.origin.topic.hash(&mut h);
            by_lane[(h.finish() % self.lanes.len() as u64) as usize].push(d);
        }
        let mut unsent = Vec::new();
        for (lane, records) in self.lanes.iter().zip(by_lane) {
            if let Err(mut back) = lane.send(records).await {
                unsent.append(&mut back);
            }
        }
        if unsent.is_empty() {
            Ok(())
        } else {
            Err(unsent)
        }
    }
}

impl Lane {
    async fn send(&self, mut records: Vec<Delivery>) -> Result<(), Vec<Delivery>> {
        while !records.is_empty() {
            let rest = if records.len() > self.capacity {
                records.split_off(self.capacity)
            } else {
                Vec::new()
            };
            let Ok(permits) = self.room.acquire_many(records.len() as u32).await else {
                records.extend(rest);
                return Err(records);
            };
            permits.forget();
            if let Err(back) = self.tx.send(records) {
                let mut back = back.0;
                back.extend(rest);
                return Err(back);
            }
            records = rest;
        }
        Ok(())
    }
}

impl LaneQueue {
    /// Waits for the first record; false once every sender is gone and the queue is
    /// drained.
    pub async fn wait(&mut self) -> bool {
        if !self.carry.is_empty() {
            return true;
        }
        match self.rx.recv().await {
            Some(records) => {
                self.carry.extend(records);
                true
            }
            None => false,
        }
    }

    /// Moves what is queued into `batch` until it holds `max`, then, while it holds
    /// fewer, waits until `deadline` for more. Room is given back as records are taken,
    /// so senders are not held up while this waits.
    pub async fn take(&mut self, batch: &mut Vec<Delivery>, max: usize, deadline: Instant) {
        loop {
            let want = max.saturating_sub(batch.len());
            if want == 0 {
                return;
            }
            if !self.carry.is_empty() {
                let n = want.min(self.carry.len());
                batch.extend(self.carry.drain(..n));
                self.room.add_permits(n);
                continue;
            }
            let received = match self.rx.try_recv() {
                Ok(records) => Some(records),
                Err(mpsc::error::TryRecvError::Disconnected) => None,
                Err(mpsc::error::TryRecvError::Empty) => {
                    tokio::time::timeout_at(deadline, self.rx.recv())
                        .await
                        .ok()
                        .flatten()
                }
            };
            match received {
                Some(records) if records.len() <= want => {
                    self.room.add_permits(records.len());
                    batch.extend(records);
                }
                Some(records) => self.carry.extend(records),
                None => return,
            }
        }
    }
}

impl Drop for LaneQueue {
    fn drop(&mut self) {
        // Senders waiting for room learn that the lane has gone.
        self.room.close();
    }
}

/// Reads how full a sink's queues are without keeping them open (the sink's lanes end
/// once every [`SinkQueue`] is gone, whatever probes remain).
#[derive(Clone)]
pub struct QueueProbe {
    lanes: Arc<[(Weak<Semaphore>, usize)]>,
}

impl QueueProbe {
    /// The lanes still running, with their room.
    fn running(&self) -> impl Iterator<Item = (Arc<Semaphore>, usize)> + '_ {
        self.lanes
            .iter()
            .filter_map(|(room, capacity)| Some((room.upgrade()?, *capacity)))
            .filter(|(room, _)| !room.is_closed())
    }

    /// Records waiting in the queues (0 once the sink stopped).
    pub fn depth(&self) -> usize {
        self.running()
            .map(|(room, capacity)| capacity.saturating_sub(room.available_permits()))
            .sum()
    }

    /// Room in all, when empty.
    pub fn capacity(&self) -> usize {
        self.running().map(|(_, capacity)| capacity).sum()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;

    use super::*;

    fn record(topic: &str, i: usize) -> Delivery {
        Delivery::detached(topic, json!({ "i": i }))
    }

    fn numbers(batch: &[Delivery]) -> Vec<u64> {
        batch
            .iter()
            .map(|d| d.record["i"].as_u64().unwrap())
            .collect()
    }

    /// What is queued now, without waiting.
    async fn take_now(q: &mut LaneQueue, max: usize) -> Vec<Delivery> {
        let mut batch = Vec::new();
        q.take(&mut batch, max, Instant::now()).await;
        batch
    }

    #[tokio::test]
    async fn a_batch_larger_than_the_room_goes_in_parts_in_order_and_waits_for_room() {
        let (queue, mut lanes) = open(1, 3, Status::ready());
        let mut lane = lanes.pop().unwrap();
        let probe = queue.probe();
        assert_eq!(probe.capacity(), 3);
        let sending = tokio::spawn(async move {
            let records = (0..8).map(|i| record("t", i)).collect();
            queue.send_all(records).await.is_ok()
        });
        // The first part fills the room; the sender waits for more.
        assert!(lane.wait().await);
        assert_eq!(probe.depth(), 3);
        let first = take_now(&mut lane, 2).await;
        assert_eq!(numbers(&first), [0, 1], "at most max per take");
        let mut taken = numbers(&first);
        let deadline = Instant::now() + Duration::from_secs(10);
        while taken.len() < 8 {
            assert!(Instant::now() < deadline, "only {taken:?} arrived");
            let more = take_now(&mut lane, 100).await;
            taken.extend(numbers(&more));
            tokio::task::yield_now().await;
        }
        assert_eq!(taken, (0..8).collect::<Vec<_>>());
        assert!(sending.await.unwrap());
        assert_eq!(probe.depth(), 0, "every permit given back");
        assert!(
            !lane.wait().await,
            "the sender is gone and the lane is drained"
        );
    }

    #[tokio::test]
    async fn take_waits_until_the_deadline_for_more() {
        let (queue, mut lanes) = open(1, 10, Status::ready());
        let mut lane = lanes.pop().unwrap();
        queue.send(record("t", 0)).await.unwrap();
        assert!(lane.wait().await);
        let later = tokio::spawn({
            let queue = queue.clone();
            async move { queue.send(record("t", 1)).await.is_ok() }
        });
        let mut batch = Vec::new();
        lane.take(&mut batch, 2, Instant::now() + Duration::from_secs(30))
            .await;
        assert_eq!(
            numbers(&batch),
            [0, 1],
            "the second came before the deadline"
        );
        assert!(later.await.unwrap());
    }

    /// A full lane whose driver is waiting for more to fill its batch has room again:
    /// the records it took no longer count.
    #[tokio::test]
    async fn room_is_given_back_while_the_driver_waits_for_more() {
        let (queue, mut lanes) = open(1, 2, Status::ready());
        let mut lane = lanes.pop().unwrap();
        queue
            .send_all(vec![record("t", 0), record("t", 1)])
            .await
            .unwrap();
        assert!(lane.wait().await);
        let more = tokio::spawn({
            let queue = queue.clone();
            async move {
                queue
                    .send_all(vec![record("t", 2), record("t", 3)])
                    .await
                    .is_ok()
            }
        });
        let mut batch = Vec::new();
        let far = Instant::now() + Duration::from_secs(600);
        tokio::time::timeout(Duration::from_secs(60), lane.take(&mut batch, 4, far))
            .await
            .expect("the batch filled without waiting for its deadline");
        assert_eq!(numbers(&batch), [0, 1, 2, 3]);
        assert!(more.await.unwrap());
    }

    #[tokio::test]
    async fn senders_waiting_for_room_get_their_records_back_when_the_lane_ends() {
        let (queue, mut lanes) = open(1, 2, Status::ready());
        let probe = queue.probe();
        queue
            .send_all(vec![record("t", 0), record("t", 1)])
            .await
            .unwrap();
        let waiting = tokio::spawn({
            let queue = queue.clone();
            async move { queue.send(record("t", 2)).await }
        });
        tokio::task::yield_now().await;
        drop(lanes.pop());
        let back = waiting.await.unwrap().expect_err("the lane has gone");
        assert_eq!(back.record["i"], 2);
        assert_eq!(probe.depth(), 0, "a stopped sink holds nothing");
        let back = queue.send_all(vec![record("t", 3)]).await.unwrap_err();
        assert_eq!(numbers(&back), [3]);
    }

    #[tokio::test]
    async fn each_topic_goes_to_one_lane_in_order() {
        let (queue, lanes) = open(4, 100, Status::ready());
        let records = (0..60)
            .map(|i| record(&format!("t/{}", i % 6), i))
            .collect();
        queue.send_all(records).await.unwrap();
        drop(queue);
        // topic → (its lane, the last number seen on it)
        let mut topics: std::collections::HashMap<bytestring::ByteString, (usize, Option<u64>)> =
            Default::default();
        let mut seen = 0;
        for (n, mut lane) in lanes.into_iter().enumerate() {
            while lane.wait().await {
                for d in take_now(&mut lane, 1000).await {
                    let i = d.record["i"].as_u64().unwrap();
                    let (lane_of, last) = topics.entry(d.origin.topic.clone()).or_insert((n, None));
                    assert_eq!(*lane_of, n, "{} on one lane", d.origin.topic);
                    assert!(last.is_none_or(|l| l < i), "{} in order", d.origin.topic);
                    *last = Some(i);
                    seen += 1;
                }
            }
        }
        assert_eq!(seen, 60);
        assert_eq!(topics.len(), 6);
    }
}
