//! `embedded:` checked into an [`EmbeddedPlan`]: the listeners, TLS (with client
//! certificates), users and ACL (with Mosquitto's files), `auth`, and every limit, each
//! out-of-range value named by its field.

use super::*;

pub(super) fn validate_embedded(
    e: &EmbeddedConfig,
    files: AuthFiles,
    errs: &mut Errors,
) -> Option<EmbeddedPlan> {
    let before = errs.len();
    let jwt_key_file = e
        .auth
        .as_ref()
        .and_then(|a| a.jwt.as_ref())
        .is_some_and(|j| {
            j.secret_file.is_some() || j.public_key_file.is_some() || j.jwks_file.is_some()
        });
    let unread = (e.password_file.is_some() && files.passwd.is_none())
        || (e.acl_file.is_some() && files.acl.is_none())
        || (jwt_key_file && files.jwt_key.is_none());
    let auth = match &e.auth {
        Some(a) => crate::config::auth::validate_auth(a, files.jwt_key, errs),
        None => Some(crate::config::auth::AuthPlan::default()),
    };
    // Clients an HTTP service or a token lets in need no user entry.
    let external_users = e.auth.as_ref().is_some_and(|a| {
        a.jwt.is_some() || a.http.as_ref().is_some_and(|h| h.authentication.is_some())
    });
    let listen = addresses(&e.listen, "embedded.listen", errs);
    let tls = e.tls.as_ref().map(|t| TlsPlan {
        listen: addresses(&t.listen, "embedded.tls.listen", errs),
        cert_file: t.cert_file.clone(),
        key_file: t.key_file.clone(),
        client_auth: client_auth(t, errs),
    });
    let websocket = e.websocket.as_ref().map(|w| WebSocketPlan {
        listen: addresses(&w.listen, "embedded.websocket.listen", errs),
        tls: w.tls,
    });
    if e.websocket.as_ref().is_some_and(|w| w.tls) && e.tls.is_none() {
        errs.push((
            "embedded.websocket.tls".into(),
            "needs the certificate of `embedded.tls` (cert_file, key_file)".into(),
        ));
    }
    let none = e.listen.as_slice().is_empty()
        && e.tls
            .as_ref()
            .is_none_or(|t| t.listen.as_slice().is_empty())
        && e.websocket
            .as_ref()
            .is_none_or(|w| w.listen.as_slice().is_empty());
    if none {
        errs.push((
            "embedded.listen".into(),
            "needs at least one address (here, in `tls` or in `websocket`)".into(),
        ));
    }
    // Clients whose certificate names them need no user entry.
    let cert_users = tls
        .as_ref()
        .and_then(|t| t.client_auth.as_ref())
        .is_some_and(|c| c.username_from.is_some());
    let mut users = Vec::new();
    for (i, u) in e.users.iter().enumerate() {
        if u.username.is_empty() || u.username == "*" {
            errs.push((
                format!("embedded.users[{i}].username"),
                "must be a non-empty name other than '*'".into(),
            ));
        } else if e.users[..i].iter().any(|o| o.username == u.username) {
            errs.push((
                format!("embedded.users[{i}].username"),
                format!("duplicate user {:?}", u.username),
            ));
        }
        if let Err(msg) = validate_hash(&u.password_hash) {
            errs.push((format!("embedded.users[{i}].password_hash"), msg));
        }
        users.push((
            u.username.clone(),
            Credential::Argon2(Secret(u.password_hash.clone())),
        ));
    }
    if let (Some(path), Some(file_users)) = (&e.password_file, files.passwd) {
        for u in file_users {
            match e.users.iter().position(|o| o.username == u.username) {
                Some(i) => errs.push((
                    format!("embedded.users[{i}].username"),
                    format!(
                        "duplicate user {:?}: also in the password file {} (line {})",
                        u.username,
                        path.display(),
                        u.line
                    ),
                )),
                None => users.push((u.username, Credential::Mosquitto(u.hash))),
            }
        }
        if users.is_empty() && !e.allow_anonymous && !cert_users && !external_users {
            errs.push((
                "embedded.password_file".into(),
                format!(
                    "no client could connect: {} holds no users, `users:` is empty and allow_anonymous is false",
                    path.display()
                ),
            ));
        }
    }
    if e.acl_file.is_some() && !e.acl.is_empty() {
        errs.push((
            "embedded.acl_file".into(),
            "set `acl` or `acl_file`, not both".into(),
        ));
    }
    let mut acl = Vec::new();
    for (i, r) in e.acl.iter().enumerate() {
        if r.username.is_empty() {
            errs.push((
                format!("embedded.acl[{i}].username"),
                "use a username or \"*\"".into(),
            ));
        }
        if r.publish.is_empty() && r.subscribe.is_empty() {
            errs.push((
                format!("embedded.acl[{i}]"),
                "needs `publish` or `subscribe` filters".into(),
            ));
        }
        for (field, list) in [("publish", &r.publish), ("subscribe", &r.subscribe)] {
            for (j, f) in list.iter().enumerate() {
                if let Err(err) = crate::topic::validate_filter(f) {
                    errs.push((
                        format!("embedded.acl[{i}].{field}[{j}]"),
                        format!("{f:?}: {err}"),
                    ));
                }
            }
        }
        acl.push(AclRule {
            username: (r.username != "*").then(|| r.username.clone()),
            allow: r.action == AclAction::Allow,
            publish: r.publish.clone(),
            subscribe: r.subscribe.clone(),
        });
    }
    if e.users.is_empty()
        && e.password_file.is_none()
        && !e.allow_anonymous
        && !cert_users
        && !external_users
    {
        errs.push((
            "embedded".into(),
            "no client could connect: add `users:` or `password_file:`, set `allow_anonymous: true`, name clients by their certificates (`tls.username_from`), or let `auth:` (an HTTP service, JWT) authenticate them".into(),
        ));
    }
    let keepalive = e.max_keepalive.0.as_secs();
    if keepalive > 65535 {
        errs.push((
            "embedded.max_keepalive".into(),
            "must be at most 65535s".into(),
        ));
    }
    if let Err(why) = e.max_packet_size.check_packet_size() {
        errs.push(("embedded.max_packet_size".into(), why));
    }
    if e.max_inflight == 0 {
        errs.push((
            "embedded.max_inflight".into(),
            "must be between 1 and 65535".into(),
        ));
    }
    for (field, value) in [
        ("max_connections", e.max_connections),
        ("max_queued_messages", e.max_queued_messages),
        ("max_connecting", e.max_connecting),
        ("max_subscriptions", e.max_subscriptions),
        ("max_topic_levels", e.max_topic_levels),
    ] {
        if value == 0 {
            errs.push((format!("embedded.{field}"), "must be at least 1".into()));
        }
    }
    let connect_timeout = e.connect_timeout.0;
    if connect_timeout < Duration::from_millis(100) || connect_timeout > Duration::from_secs(300) {
        errs.push((
            "embedded.connect_timeout".into(),
            "must be between 100ms and 5m".into(),
        ));
    }
    let send_timeout = e.send_timeout.0;
    if send_timeout < Duration::from_millis(100) || send_timeout > Duration::from_secs(3600) {
        errs.push((
            "embedded.send_timeout".into(),
            "must be between 100ms and 1h".into(),
        ));
    }
    if !(e.connection_rate_per_ip >= 0.0 && e.connection_rate_per_ip <= 1e6) {
        errs.push((
            "embedded.connection_rate_per_ip".into(),
            "must be between 0 (no limit) and 1000000 connections per second".into(),
        ));
    }
    if !(e.max_publish_rate >= 0.0 && e.max_publish_rate <= 1e7) {
        errs.push((
            "embedded.max_publish_rate".into(),
            "must be between 0 (no limit) and 10000000 messages per second".into(),
        ));
    }
    let sys_interval = e.sys_interval.0;
    if !sys_interval.is_zero()
        && (sys_interval < Duration::from_millis(100) || sys_interval > Duration::from_secs(86400))
    {
        errs.push((
            "embedded.sys_interval".into(),
            "must be 0s (never) or between 100ms and 24h".into(),
        ));
    }
    if e.max_topic_length.0 == 0 || e.max_topic_length.0 > 65535 {
        errs.push((
            "embedded.max_topic_length".into(),
            "must be between 1 byte and 65535 bytes (MQTT's own limit)".into(),
        ));
    }
    let session_expiry = e.session_expiry.0.as_secs();
    if session_expiry == 0 || session_expiry >= u32::MAX as u64 {
        errs.push((
            "embedded.session_expiry".into(),
            "must be at least 1s and less than 136 years".into(),
        ));
    }
    if let Some(p) = &e.persistence {
        if p.path.as_os_str().is_empty() {
            errs.push((
                "embedded.persistence.path".into(),
                "needs a file name".into(),
            ));
        }
        let f = p.flush_interval.0;
        if f.is_zero() || f > Duration::from_secs(60) {
            errs.push((
                "embedded.persistence.flush_interval".into(),
                "must be between 1ms and 60s".into(),
            ));
        }
    }
    (errs.len() == before && !unread).then(|| EmbeddedPlan {
        listen,
        listen_var: None,
        allow_anonymous: e.allow_anonymous,
        users,
        acl: match files.acl {
            Some(file) => Acl::Mosquitto(Arc::new(file)),
            None => Acl::Rules(acl),
        },
        // None only along with an error.
        auth: auth.unwrap_or_default(),
        max_keepalive: keepalive.min(65535) as u16,
        max_packet_size: e.max_packet_size.0 as usize,
        max_connections: e.max_connections,
        max_inflight: e.max_inflight,
        max_queued_messages: e.max_queued_messages,
        connect_timeout,
        send_timeout,
        max_connecting: e.max_connecting,
        connection_rate_per_ip: e.connection_rate_per_ip,
        max_publish_rate: e.max_publish_rate,
        max_subscriptions: e.max_subscriptions,
        topic_limits: crate::topic::TopicLimits {
            length: e.max_topic_length.0 as usize,
            levels: e.max_topic_levels,
        },
        sys_interval: (!sys_interval.is_zero()).then_some(sys_interval),
        tls,
        websocket,
        session_expiry: session_expiry.clamp(1, u32::MAX as u64 - 1) as u32,
        persistence: e.persistence.as_ref().map(|p| PersistencePlan {
            path: p.path.clone(),
            flush_interval: p.flush_interval.0,
        }),
    })
}

/// `embedded.tls`'s client certificate settings: `require_client_cert` and
/// `username_from` mean something only with `client_ca_file`.
fn client_auth(
    t: &crate::config::raw::TlsListenerConfig,
    errs: &mut Errors,
) -> Option<ClientAuthPlan> {
    let Some(ca_file) = &t.client_ca_file else {
        for (field, set) in [
            ("require_client_cert", t.require_client_cert.is_some()),
            ("username_from", t.username_from.is_some()),
        ] {
            if set {
                errs.push((
                    format!("embedded.tls.{field}"),
                    "needs `client_ca_file` (the CA certificates that sign client certificates)"
                        .into(),
                ));
            }
        }
        return None;
    };
    Some(ClientAuthPlan {
        ca_file: ca_file.clone(),
        required: t.require_client_cert.unwrap_or(true),
        username_from: t.username_from,
    })
}
