"""README's picture of `finetune board` over real runs, e.g. the methods sweep on the quickstart:

    python scripts/board_screenshot.py runs docs/board.png

Starts `finetune board RUNS --no-token` on a free loopback port, opens the page in Debian's headless chromium
(Selenium, /usr/bin/chromium and /usr/bin/chromedriver), waits until the runs table and the loss chart are drawn,
saves the screenshot and stops the board. Needs finetune[board] and selenium (both in the test extra).
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
import urllib.request

from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", help="The runs directory to show.")
    ap.add_argument("out", help="The PNG file to write.")
    ap.add_argument("--size", default="1500,1100", help="Window size, WIDTH,HEIGHT.")
    args = ap.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    board = subprocess.Popen([sys.executable, "-m", "finetune", "board", args.runs, "--port", str(port), "--no-token"])
    try:
        for _ in range(120):  # up to a minute for the board to listen
            try:
                urllib.request.urlopen(url, timeout=2).close()
                break
            except OSError:
                time.sleep(0.5)
        options = webdriver.ChromeOptions()
        options.binary_location = "/usr/bin/chromium"
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={args.size}"):
            options.add_argument(arg)
        driver = webdriver.Chrome(options=options, service=webdriver.ChromeService("/usr/bin/chromedriver"))
        try:
            driver.get(url)
            wait = WebDriverWait(driver, 60)
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#runs-table tbody tr[data-run]"))
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".js-plotly-plot .scatterlayer .trace"))
            time.sleep(2)  # the other charts draw from the same poll
            driver.save_screenshot(args.out)
        finally:
            driver.quit()
    finally:
        board.terminate()
        board.wait(timeout=30)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
