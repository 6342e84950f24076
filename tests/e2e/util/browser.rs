//! Headless Chromium for the dashboard's test, driven over the Chrome DevTools Protocol
//! (a WebSocket with JSON commands): open a page, run JavaScript in it, wait for what it
//! shows, and save a screenshot. The browser gets a profile of its own in a temp dir and
//! a free debugging port (it picks one; `DevToolsActivePort` in the profile says which).
//!
//! The binary is `$MQBRIDGE_CHROMIUM`, else `chromium` (Debian's package, which the test
//! command installs when missing).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use futures::{SinkExt as _, StreamExt as _};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

use super::eventually;

pub struct Browser {
    child: Child,
    page: WebSocketStream<TcpStream>,
    next_id: u64,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Browser {
    /// Starts Chromium with its profile under `dir` and connects to its first page.
    pub async fn start(dir: &Path) -> Browser {
        let binary = std::env::var_os("MQBRIDGE_CHROMIUM").unwrap_or_else(|| "chromium".into());
        let profile = dir.join("chromium-profile");
        let child = Command::new(&binary)
            .args([
                "--headless=new",
                // Running as root (CI): Chromium refuses its sandbox then.
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--disable-background-networking",
                "--window-size=1280,2000",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {} ({e}): install Debian's chromium (scripts/test.sh does) or set MQBRIDGE_CHROMIUM",
                    PathBuf::from(&binary).display()
                )
            });
        let active = profile.join("DevToolsActivePort");
        let port: u16 = eventually(
            Duration::from_secs(30),
            "Chromium's debugging port",
            async || {
                std::fs::read_to_string(&active)
                    .ok()?
                    .lines()
                    .next()?
                    .parse()
                    .ok()
            },
        )
        .await;
        let page_url = eventually(Duration::from_secs(30), "a page target", async || {
            let list: serde_json::Value =
                reqwest::get(format!("http://127.0.0.1:{port}/json/list"))
                    .await
                    .ok()?
                    .json()
                    .await
                    .ok()?;
            list.as_array()?
                .iter()
                .find(|t| t["type"] == "page")
                .and_then(|t| t["webSocketDebuggerUrl"].as_str().map(String::from))
        })
        .await;
        let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let (page, _) = tokio_tungstenite::client_async(page_url.as_str(), stream)
            .await
            .expect("the page's DevTools WebSocket");
        let mut browser = Browser {
            child,
            page,
            next_id: 0,
        };
        browser.call("Page.enable", serde_json::json!({})).await;
        browser.call("Runtime.enable", serde_json::json!({})).await;
        browser
    }

    /// Sends one command and returns its result (events in between are skipped).
    pub async fn call(&mut self, method: &str, params: serde_json::Value) -> serde_json::Value {
        self.next_id += 1;
        let id = self.next_id;
        let command = serde_json::json!({ "id": id, "method": method, "params": params });
        self.page
            .send(Message::Text(command.to_string().into()))
            .await
            .unwrap();
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(30), self.page.next())
                .await
                .unwrap_or_else(|_| panic!("{method}: no answer from Chromium"))
                .expect("Chromium closed the connection")
                .unwrap();
            let Message::Text(text) = msg else { continue };
            let reply: serde_json::Value = serde_json::from_str(&text).unwrap();
            if reply["id"] != id {
                continue;
            }
            if let Some(error) = reply.get("error") {
                panic!("{method}: {error}");
            }
            return reply["result"].clone();
        }
    }

    /// Opens `url` and waits until it has loaded.
    pub async fn open(&mut self, url: &str) {
        self.call("Page.navigate", serde_json::json!({ "url": url }))
            .await;
        self.wait_for(
            "document.readyState === 'complete' && location.href",
            "the page to load",
        )
        .await;
    }

    /// The value of the JavaScript expression `js` (awaited when it is a promise); a
    /// JavaScript exception fails the test.
    pub async fn eval(&mut self, js: &str) -> serde_json::Value {
        let result = self
            .call(
                "Runtime.evaluate",
                serde_json::json!({ "expression": js, "awaitPromise": true, "returnByValue": true }),
            )
            .await;
        if let Some(e) = result.get("exceptionDetails") {
            panic!("{js}: {e}");
        }
        result["result"]["value"].clone()
    }

    /// Polls `js` until it gives a truthy value (not null, false, 0 or ""), for up to
    /// 30 s; returns that value.
    pub async fn wait_for(&mut self, js: &str, what: &str) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let v = self.eval(js).await;
            let truthy = !matches!(&v, serde_json::Value::Null | serde_json::Value::Bool(false))
                && v != 0
                && v != "";
            if truthy {
                return v;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what} ({js} is {v})"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Saves a PNG of the whole page at `path`.
    pub async fn screenshot(&mut self, path: &Path) {
        let shot = self
            .call(
                "Page.captureScreenshot",
                serde_json::json!({ "format": "png", "captureBeyondViewport": true }),
            )
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().expect("screenshot data"))
            .unwrap();
        std::fs::write(path, png).unwrap();
    }
}
