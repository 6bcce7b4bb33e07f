#!/bin/sh
# Chromium in kiosk mode on the edge-slm kiosk page, once the server answers.
# Started by the desktop session (labwc's or wayfire's autostart, see README.md) as the
# logged-in user. KIOSK_URL overrides the page's address (e.g. to add ?idle_timeout_s=60).
URL="${KIOSK_URL:-http://127.0.0.1:8080/}"
HEALTH="${URL%/*}/health"

# Wait for the server (it is up at once, then loads its bundle): at most 3 minutes.
i=0
while [ "$i" -lt 180 ]; do
    if command -v curl >/dev/null; then
        curl -fs -o /dev/null "$HEALTH" && break
    else
        python3 -c "import urllib.request as u; u.urlopen('$HEALTH', timeout=2)" 2>/dev/null && break
    fi
    i=$((i + 1))
    sleep 1
done

BROWSER=$(command -v chromium-browser || command -v chromium)
# A fresh profile each boot: no restore-session bubble, no history from the last visitor.
PROFILE="${XDG_RUNTIME_DIR:-/tmp}/edge-slm-kiosk-chromium"
rm -rf "$PROFILE"

# Flags: full screen with no way out, no first-run or error bubbles, no translate offer,
# no swipe-back navigation or pinch zoom on the touchscreen, no update checks, no
# background connections (the kiosk may be offline).
exec "$BROWSER" --kiosk "$URL" \
    --user-data-dir="$PROFILE" \
    --noerrdialogs --disable-infobars --no-first-run --no-default-browser-check \
    --disable-session-crashed-bubble --disable-features=Translate \
    --overscroll-history-navigation=0 --disable-pinch \
    --disable-background-networking --disable-component-update --disable-sync \
    --check-for-update-interval=31536000 --password-store=basic \
    --ozone-platform-hint=auto
