//! SUBSCRIBE and UNSUBSCRIBE: filters validated (one the specifications refuse closes the
//! connection, before any filter of the packet is applied), then checked against the
//! limits and the ACL (a refused filter gets its own failure code, the others are
//! granted), shared subscriptions (`$share/GROUP/filter`), and the retained messages a
//! new subscription receives.

use super::{Conn, ProtocolError};
use crate::broker::auth::chain::Subscribed;
use crate::broker::codec::{Outgoing, SubscribeFilter, Version};
use crate::broker::session::{Outbound, Subscription};
use crate::topic::{split_shared, validate_filter};

/// A filter of a SUBSCRIBE or UNSUBSCRIBE, split from its share group. The wildcard rules
/// ([MQTT-4.7.1-2], [MQTT-4.7.1-3] in 3.1.1; [MQTT-4.7.1-1], [MQTT-4.7.1-2] in 5.0), a
/// filter not empty [MQTT-4.7.3-1] and without U+0000 [MQTT-4.7.3-2], and in MQTT 5 the
/// share name ([MQTT-4.8.2-1], [MQTT-4.8.2-2]): a filter breaking them closes the
/// connection. In 3.1.1 `$share/` means nothing, so a valid filter that is not a share
/// mqbridge can serve is Ok(None), refused on its own.
fn checked_filter(
    filter: &str,
    version: Version,
) -> Result<Option<(Option<&str>, &str)>, ProtocolError> {
    match split_shared(filter) {
        Ok(split) => Ok(Some(split)),
        Err(_) if version == Version::V311 && validate_filter(filter).is_ok() => Ok(None),
        Err(e) => Err(ProtocolError::FilterInvalid(e)),
    }
}

impl Conn {
    pub(super) async fn subscribe(
        &mut self,
        pkid: u16,
        filters: Vec<SubscribeFilter>,
        id: Option<usize>,
    ) -> Result<(), ProtocolError> {
        let v5 = self.version == Version::V5;
        let mut checked = Vec::with_capacity(filters.len());
        for f in &filters {
            let split = checked_filter(&f.filter, self.version)?;
            // [MQTT-3.8.3-4] (5.0): no local on a shared subscription is a protocol error.
            if f.no_local && split.is_some_and(|(share, _)| share.is_some()) {
                return Err(ProtocolError::SharedNoLocal);
            }
            checked.push(split);
        }
        let mut codes = Vec::with_capacity(filters.len());
        let mut retained = Vec::new();
        for (f, split) in filters.iter().zip(checked) {
            let Some((share, filter)) = split else {
                codes.push(0x80);
                continue;
            };
            let limits = self.shared.plan.topic_limits;
            if limits.check(filter).is_err() {
                codes.push(if v5 { 0x8F } else { 0x80 });
                continue;
            }
            let granted = match self.may_subscribe(filter, f.qos).await {
                Subscribed::Refused => {
                    tracing::info!(client_id = %self.client_id, %filter, "embedded broker: subscription refused by the ACL");
                    codes.push(if v5 { 0x87 } else { 0x80 });
                    continue;
                }
                Subscribed::Whole => true,
                Subscribed::Local => false,
            };
            let (share, filter) = (share.map(str::to_string), filter.to_string());
            let sub = Subscription {
                filter: filter.clone(),
                share: share.clone(),
                qos: f.qos,
                no_local: f.no_local,
                retain_as_published: f.retain_as_published,
                id,
                granted,
            };
            let mut state = self.shared.change();
            let max = self.shared.plan.max_subscriptions;
            let full = state.sessions.get(&self.client_id).is_some_and(|s| {
                s.subscriptions.len() >= max && !s.subscriptions.contains_key(&f.filter)
            });
            if full {
                tracing::info!(client_id = %self.client_id, max, "embedded broker: subscription refused, the client holds max_subscriptions");
                codes.push(if v5 { 0x97 } else { 0x80 });
                continue;
            }
            let Some(existed) = state.subscribe(&self.client_id, f.filter.clone(), sub) else {
                return Err(ProtocolError::SessionGone);
            };
            let send_retained =
                share.is_none() && (f.retain_handling == 0 || (f.retain_handling == 1 && !existed));
            if send_retained {
                let auth = self.shared.auth();
                for m in state.retained.matching(&filter) {
                    if !granted && !auth.can_receive(self.identity(), &m.topic) {
                        continue;
                    }
                    retained.push(Outbound {
                        qos: m.qos.min(f.qos),
                        msg: m,
                        retain: true,
                        subscription_ids: id.into_iter().collect(),
                    });
                }
            }
            codes.push(f.qos);
        }
        self.send(Outgoing::SubAck { pkid, codes }).await?;
        if !retained.is_empty() {
            let max = self.shared.plan.max_queued_messages;
            let counters = &self.shared.counters;
            self.with_session(|s| {
                for r in retained {
                    if let Err(why) = s.enqueue(r, max) {
                        counters.dropped(why);
                    }
                }
            });
            self.pump();
        }
        Ok(())
    }

    /// UNSUBSCRIBE: 0x11 (no subscription existed) for a filter not subscribed; its
    /// filters follow the same rules as a SUBSCRIBE's.
    pub(super) async fn unsubscribe(
        &mut self,
        pkid: u16,
        filters: Vec<String>,
    ) -> Result<(), ProtocolError> {
        for f in &filters {
            checked_filter(f, self.version)?;
        }
        let codes = {
            let mut state = self.shared.change();
            filters
                .iter()
                .map_while(|f| state.unsubscribe(&self.client_id, f))
                .map(|existed| if existed { 0x00 } else { 0x11 })
                .collect()
        };
        self.send(Outgoing::UnsubAck { pkid, codes }).await
    }
}
