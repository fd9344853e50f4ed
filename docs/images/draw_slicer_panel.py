"""Draw docs/images/slicer_panel.png: a labelled diagram of the CTReasoner panel (run with any Python + pillow)."""
import os

from PIL import Image, ImageDraw, ImageFont

W, H = 560, 900
FONT = ImageFont.load_default()
img = Image.new("RGB", (W, H), (246, 246, 246))
d = ImageDraw.Draw(img)


def section(y, title, height):
    d.rectangle((10, y, W - 10, y + height), outline=(150, 150, 150), fill=(255, 255, 255))
    d.rectangle((10, y, W - 10, y + 22), fill=(220, 226, 236))
    d.text((18, y + 5), "v " + title, fill=(0, 0, 0), font=FONT)
    return y + 30


def button(x, y, w, label, color=(235, 235, 235)):
    d.rounded_rectangle((x, y, x + w, y + 24), radius=4, fill=color, outline=(140, 140, 140))
    d.text((x + 8, y + 6), label, fill=(0, 0, 0), font=FONT)


def field(x, y, w, text, label=None):
    if label:
        d.text((x, y + 6), label, fill=(60, 60, 60), font=FONT)
        x += 120
        w -= 120
    d.rectangle((x, y, x + w, y + 24), outline=(150, 150, 150), fill=(255, 255, 255))
    d.text((x + 6, y + 6), text, fill=(80, 80, 80), font=FONT)


y = section(10, "Chat", 440)
field(20, y, 520, "abdomen_ct  v", "CT volume:")
y += 32
d.rectangle((20, y, 540, y + 210), outline=(150, 150, 150), fill=(252, 252, 252))
lines = [((31, 95, 168), "You: segment the left adrenal gland  [slice 42]"),
         ((46, 125, 50), "CTReasoner: A thin inverted-Y structure above the left kidney,"),
         ((46, 125, 50), "  lateral to the aorta, soft-tissue density ... (reasoning in full)"),
         ((0, 0, 238), "  Created: left adrenal gland | left adrenal gland box 1 (0.93)"),
         ((0, 0, 238), "           left adrenal gland closer look (slice 42)"),
         ((31, 95, 168), "You: detect the kidneys  [every slice]"),
         ((46, 125, 50), "CTReasoner: ... Found on 31 of 96 slices (28-58)."),
         ((183, 28, 28), "Problem: the Red view is not aligned with the axial (K) axis"),
         ((90, 90, 90), "  Fix: reset the view to the volume's axial plane ...")]
for i, (color, text) in enumerate(lines):
    d.text((28, y + 8 + i * 20), text, fill=color, font=FONT)
y += 218
field(20, y, 440, "e.g. segment the pancreas - Enter sends")
button(468, y, 72, "Send", (200, 230, 201))
y += 32
field(20, y, 520, "Current slice (Red view)  v", "Slices:")
y += 30
field(20, y, 520, "ask  v", "Existing segment:")
y += 30
d.text((140, y + 4), "[x] Always take a closer look (small organs)", fill=(0, 0, 0), font=FONT)
y += 26
button(20, y, 110, "Closer look")
button(140, y, 70, "Undo")
button(220, y, 90, "Clear chat")
d.rectangle((320, y + 4, 470, y + 20), outline=(150, 150, 150))
d.rectangle((320, y + 4, 400, y + 20), fill=(100, 160, 230))
button(478, y, 62, "Cancel")

y = section(460, "Refine", 150)
field(20, y, 520, "(last answer's organ)  v", "Organ:")
y += 30
field(20, y, 520, "[+] CTReasoner include   (place)", "Include points:")
y += 30
field(20, y, 520, "[-] CTReasoner exclude   (place)", "Exclude points:")
y += 30
field(20, y, 520, "[ ] CTReasoner box   (draw ROI)", "Box:")

y = section(620, "Propagate 3D", 90)
field(20, y, 250, "both  v", "Direction:")
d.text((290, y + 6), "[x] Whole volume   range 0 .. 95", fill=(0, 0, 0), font=FONT)
y += 30
button(140, y, 260, "Propagate from the current slice")

y = section(720, "Backend", 170)
field(20, y, 520, "Local  v   (Local | Remote via SSH | URL)", "Run the model:")
y += 30
field(20, y, 520, "~/CTReasoner-backend/bin/python", "Backend Python:")
y += 30
field(20, y, 520, "(default: CTReasoner-Tiny)", "Model folder:")
y += 30
button(20, y, 70, "Start")
button(98, y, 70, "Stop")
button(176, y, 130, "Test connection")
d.text((318, y + 6), "* ready", fill=(46, 125, 50), font=FONT)
y += 30
d.text((20, y), "CTReasoner-Tiny, device cpu, dtype float32, server 0.1.0, protocol 1.1", fill=(60, 60, 60), font=FONT)
d.text((20, y + 16), "> Set up local backend (creates a venv, installs the backend with pinned torch)",
       fill=(60, 60, 60), font=FONT)

img.save(os.path.join(os.path.dirname(os.path.abspath(__file__)), "slicer_panel.png"))
