//! SUBSCRIBE and UNSUBSCRIBE: filters validated and checked against the ACL (a refused
//! filter gets its own failure code, the others are granted), shared subscriptions
//! (`$share/GROUP/filter`), and the retained messages a new subscription receives.

use super::{Conn, ProtocolError};
use crate::broker::auth::chain::Subscribed;
use crate::broker::codec::{Outgoing, SubscribeFilter, Version};
use crate::broker::session::{Outbound, Subscription};
use crate::topic::validate_filter;

impl Conn {
    pub(super) async fn subscribe(
        &mut self,
        pkid: u16,
        filters: Vec<SubscribeFilter>,
        id: Option<usize>,
    ) -> Result<(), ProtocolError> {
        let v5 = self.version == Version::V5;
        let mut codes = Vec::with_capacity(filters.len());
        let mut retained = Vec::new();
        for f in filters {
            let (share, filter) = match f.filter.strip_prefix("$share/") {
                Some(rest) => match rest.split_once('/') {
                    Some((group, filter)) if !group.is_empty() && !group.contains(['+', '#']) => {
                        (Some(group.to_string()), filter.to_string())
                    }
                    _ => {
                        codes.push(if v5 { 0x8F } else { 0x80 });
                        continue;
                    }
                },
                None => (None, f.filter.clone()),
            };
            if share.is_some() && f.no_local {
                return Err(ProtocolError::SharedNoLocal);
            }
            let limits = self.shared.plan.topic_limits;
            if validate_filter(&filter)
                .and_then(|()| limits.check(&filter))
                .is_err()
            {
                codes.push(if v5 { 0x8F } else { 0x80 });
                continue;
            }
            let granted = match self.may_subscribe(&filter, f.qos).await {
                Subscribed::Refused => {
                    tracing::info!(client_id = %self.client_id, %filter, "embedded broker: subscription refused by the ACL");
                    codes.push(if v5 { 0x87 } else { 0x80 });
                    continue;
                }
                Subscribed::Whole => true,
                Subscribed::Local => false,
            };
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

    /// UNSUBSCRIBE: 0x11 (no subscription existed) for a filter not subscribed.
    pub(super) async fn unsubscribe(
        &mut self,
        pkid: u16,
        filters: Vec<String>,
    ) -> Result<(), ProtocolError> {
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
