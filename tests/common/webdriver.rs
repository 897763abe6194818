#![allow(dead_code)]

//! A minimal W3C WebDriver client over reqwest, driving Debian's Chromium through its
//! `chromedriver`: sessions, navigation, elements by CSS selector, clicks, keys, scripts,
//! polling until a condition holds, and screenshots.
//!
//! The browser tests fail (never skip) when `/usr/bin/chromium` or `/usr/bin/chromedriver` is
//! missing: `.ci/run` installs them (`apt-get install chromium chromium-driver`).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{Value, json};

pub const CHROMIUM: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// The key W3C WebDriver names an element reference by.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

/// Keys as WebDriver encodes them.
pub mod keys {
    pub const ESCAPE: &str = "\u{E00C}";
    pub const ARROW_LEFT: &str = "\u{E012}";
    pub const ARROW_RIGHT: &str = "\u{E014}";
    pub const TAB: &str = "\u{E004}";
    pub const ENTER: &str = "\u{E007}";
}

/// A `chromedriver` on a free port, killed when dropped.
pub struct Driver {
    child: Child,
    pub url: String,
    http: reqwest::Client,
}

impl Driver {
    pub async fn start() -> Driver {
        for program in [CHROMIUM, CHROMEDRIVER] {
            assert!(
                Path::new(program).exists(),
                "{program} is missing: install Debian's `chromium` and `chromium-driver` \
                 (`apt-get install -y chromium chromium-driver`; .ci/run does it)"
            );
        }
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let driver = Driver { child, url: format!("http://127.0.0.1:{port}"), http: reqwest::Client::new() };
        let started = Instant::now();
        loop {
            let status = driver.http.get(format!("{}/status", driver.url)).send().await;
            if let Ok(response) = status
                && let Ok(body) = response.json::<Value>().await
                && body["value"]["ready"] == true
            {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(20), "chromedriver did not become ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        driver
    }

    /// A new headless Chromium with its own profile in `profile`.
    pub async fn session(&self, profile: &Path) -> Browser {
        let args = vec![
            "--headless=new".to_owned(),
            "--no-sandbox".to_owned(),
            "--disable-gpu".to_owned(),
            "--disable-quic".to_owned(),
            "--no-first-run".to_owned(),
            "--no-default-browser-check".to_owned(),
            "--disable-background-networking".to_owned(),
            "--disable-component-update".to_owned(),
            "--disable-sync".to_owned(),
            "--disable-dev-shm-usage".to_owned(),
            "--disable-extensions".to_owned(),
            "--hide-scrollbars".to_owned(),
            "--window-size=1280,900".to_owned(),
            format!("--user-data-dir={}", profile.display()),
        ];
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": CHROMIUM, "args": args},
            "unhandledPromptBehavior": "ignore",
        }}});
        let response = self.http.post(format!("{}/session", self.url)).json(&capabilities).send().await.unwrap();
        let body: Value = response.json().await.unwrap();
        let id = body["value"]["sessionId"].as_str().unwrap_or_else(|| panic!("no session: {body}")).to_owned();
        Browser { base: format!("{}/session/{id}", self.url), http: self.http.clone(), open: true }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One browser session.
pub struct Browser {
    base: String,
    http: reqwest::Client,
    /// Not quit yet: dropping it (a failed test) ends the session, closing Chromium.
    open: bool,
}

/// An element of the page.
#[derive(Clone, Debug)]
pub struct Element(pub String);

impl Browser {
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Result<Value, Value> {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("chromedriver answers");
        let ok = response.status().is_success();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if ok { Ok(body["value"].clone()) } else { Err(body["value"].clone()) }
    }

    async fn post(&self, path: &str, body: Value) -> Value {
        self.call(reqwest::Method::POST, path, Some(body)).await.unwrap_or_else(|e| panic!("POST {path}: {e}"))
    }

    async fn get(&self, path: &str) -> Value {
        self.call(reqwest::Method::GET, path, None).await.unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    pub async fn goto(&self, url: &str) {
        self.post("/url", json!({"url": url})).await;
    }

    pub async fn set_window_size(&self, width: u32, height: u32) {
        self.post("/window/rect", json!({"width": width, "height": height})).await;
    }

    /// The first element matching `css`, if any.
    pub async fn find(&self, css: &str) -> Option<Element> {
        let found =
            self.call(reqwest::Method::POST, "/element", Some(json!({"using": "css selector", "value": css}))).await;
        found.ok().and_then(|value| value[ELEMENT_KEY].as_str().map(|id| Element(id.to_owned())))
    }

    pub async fn find_all(&self, css: &str) -> Vec<Element> {
        let found = self.post("/elements", json!({"using": "css selector", "value": css})).await;
        found.as_array().unwrap().iter().map(|value| Element(value[ELEMENT_KEY].as_str().unwrap().to_owned())).collect()
    }

    /// The element matching `css`, waiting up to `limit` for it to appear.
    pub async fn wait_for(&self, css: &str, limit: Duration) -> Element {
        let started = Instant::now();
        loop {
            if let Some(element) = self.find(css).await {
                return element;
            }
            assert!(started.elapsed() < limit, "timed out after {limit:?} waiting for {css}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn click(&self, element: &Element) {
        self.post(&format!("/element/{}/click", element.0), json!({})).await;
    }

    /// Clicks the element matching `css` (waiting for it).
    pub async fn click_css(&self, css: &str) {
        let element = self.wait_for(css, Duration::from_secs(10)).await;
        self.click(&element).await;
    }

    /// Types into an element; a file input takes absolute paths, several separated by `\n`.
    pub async fn send_keys(&self, element: &Element, text: &str) {
        self.post(&format!("/element/{}/value", element.0), json!({"text": text})).await;
    }

    /// Presses a key (see [`keys`]) on whatever has the focus.
    pub async fn press(&self, key: &str) {
        let actions = json!({"actions": [{"type": "key", "id": "keyboard", "actions": [
            {"type": "keyDown", "value": key}, {"type": "keyUp", "value": key}
        ]}]});
        self.post("/actions", actions).await;
    }

    pub async fn text(&self, element: &Element) -> String {
        self.get(&format!("/element/{}/text", element.0)).await.as_str().unwrap_or_default().to_owned()
    }

    /// Runs `script` (a function body; `arguments` holds `args`) and returns its value.
    pub async fn execute(&self, script: &str, args: Vec<Value>) -> Value {
        self.post("/execute/sync", json!({"script": script, "args": args})).await
    }

    /// Evaluates `expression` in the page.
    pub async fn eval(&self, expression: &str) -> Value {
        self.execute(&format!("return ({expression});"), vec![]).await
    }

    /// Polls `expression` until it is truthy, failing the test after `limit`.
    pub async fn wait_until(&self, expression: &str, limit: Duration) -> Value {
        let started = Instant::now();
        loop {
            let value = self
                .call(
                    reqwest::Method::POST,
                    "/execute/sync",
                    Some(json!({
                        "script": format!("return ({expression});"), "args": []
                    })),
                )
                .await;
            if let Ok(value) = value
                && truthy(&value)
            {
                return value;
            }
            assert!(started.elapsed() < limit, "timed out after {limit:?} waiting until {expression}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A PNG of the viewport, written to `path`.
    pub async fn screenshot(&self, path: &Path) {
        let encoded = self.get("/screenshot").await;
        let bytes = base64::engine::general_purpose::STANDARD.decode(encoded.as_str().unwrap()).expect("base64 PNG");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).unwrap();
        }
        std::fs::write(path, bytes).unwrap();
    }

    /// A PNG of the whole page: the window grows to the page's height for the shot, then
    /// returns to its size.
    pub async fn screenshot_full_page(&self, path: &Path) {
        let rect = self.get("/window/rect").await;
        let chrome = self.eval("window.outerHeight - window.innerHeight").await.as_i64().unwrap_or(0);
        let page = self.eval("Math.ceil(document.documentElement.scrollHeight)").await.as_i64().unwrap();
        let width = rect["width"].as_u64().unwrap() as u32;
        self.set_window_size(width, (page + chrome.max(0)) as u32).await;
        self.screenshot(path).await;
        self.set_window_size(width, rect["height"].as_u64().unwrap() as u32).await;
    }

    /// Whether an alert (or other dialog of the browser's own) is open.
    pub async fn alert_open(&self) -> bool {
        self.call(reqwest::Method::GET, "/alert/text", None).await.is_ok()
    }

    pub async fn quit(mut self) {
        let _ = self.call(reqwest::Method::DELETE, "", None).await;
        self.open = false;
    }
}

impl Drop for Browser {
    /// A test that fails mid-way drops its session here, in a plain blocking request (no
    /// runtime is at hand in `drop`), so that no Chromium outlives the test.
    fn drop(&mut self) {
        if !self.open {
            return;
        }
        let Some(rest) = self.base.strip_prefix("http://") else { return };
        let Some((host, path)) = rest.split_once('/') else { return };
        if let Ok(mut stream) = std::net::TcpStream::connect(host) {
            use std::io::{Read, Write};
            let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
            let request =
                format!("DELETE /{path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            let _ = stream.write_all(request.as_bytes());
            let _ = stream.read_to_end(&mut Vec::new());
        }
    }
}

fn truthy(value: &Value) -> bool {
    match value {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|n| n != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(_) | Value::Object(_) => true,
    }
}

/// Where the last run's screenshots are kept: `target/browser-screenshots/`.
pub fn screenshot_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("browser-screenshots")
}
