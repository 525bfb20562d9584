"""A stand-in for a vLLM-Omni speech server, following its documented API.

GET /v1/models, GET and POST /v1/audio/voices, POST /v1/audio/speech streaming raw 24 kHz
16-bit PCM (`stream_format: audio`). It records what it is sent, and can be told to stall before
its first byte, to fail before or during the audio, or to refuse voice uploads. It runs on its
own thread and event loop, on a fixed loopback port so it can be stopped and started again.
"""

from __future__ import annotations

import asyncio
import threading

import numpy as np
from aiohttp import web

PRESETS = ["aiden", "dylan", "eric", "ono_anna", "ryan", "serena", "sohee", "uncle_fu", "vivian"]
MODEL = "Qwen/Qwen3-TTS-12Hz-1.7B-CustomVoice"
BASE_MODEL = "Qwen/Qwen3-TTS-12Hz-1.7B-Base"  # a server of this model clones voices


def tone(seconds: float) -> bytes:
    t = np.arange(int(24000 * seconds)) / 24000
    return (0.3 * np.sin(2 * np.pi * 220 * t) * 32767).astype("<i2").tobytes()


class VllmOmniDouble:
    def __init__(self, port: int, accepts_uploads: bool = True, model: str = MODEL) -> None:
        self.port = port
        self.model = model
        self.accepts_uploads = accepts_uploads
        self.speech_requests: list[dict] = []
        self.uploads: list[dict] = []
        self.first_byte_delay = 0.0
        self.fail = None  # None, "before-audio" or "mid-audio"
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/audio/voices", self.voices)
        if self.accepts_uploads:
            app.router.add_post("/v1/audio/voices", self.upload)
        app.router.add_post("/v1/audio/speech", self.speech)
        return app

    async def models(self, request):
        return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model"}]})

    async def voices(self, request):
        uploaded = [{"name": u["name"], "ref_text": u.get("ref_text")} for u in self.uploads]
        return web.json_response({"voices": PRESETS + [u["name"] for u in self.uploads], "uploaded_voices": uploaded})

    async def upload(self, request):
        form = await request.post()
        sample = form["audio_sample"]
        record = {key: value for key, value in form.items() if key != "audio_sample"}
        record["audio_bytes"] = len(sample.file.read())
        self.uploads.append(record)
        return web.json_response({"success": True, "voice": {"name": record["name"]}})

    async def speech(self, request):
        body = await request.json()
        self.speech_requests.append(body)
        if body.get("voice") not in PRESETS + [u["name"] for u in self.uploads] and "ref_audio" not in body:
            return web.json_response({"error": {"message": f"Unknown voice {body.get('voice')}", "type": "invalid_request_error", "param": "voice", "code": 400}}, status=400)
        await asyncio.sleep(self.first_byte_delay)
        if self.fail == "before-audio":
            request.transport.close()
            return web.Response(status=500)
        response = web.StreamResponse(headers={"Content-Type": "audio/pcm"})
        await response.prepare(request)
        audio = tone(1.0)
        for start in range(0, len(audio), 9600):
            await response.write(audio[start : start + 9600])
            await asyncio.sleep(0.02)
            if self.fail == "mid-audio":
                request.transport.close()
                return response
        await response.write_eof()
        return response

    # Running

    def start(self) -> None:
        started = threading.Event()

        async def main():
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            runner = web.AppRunner(self._app(), shutdown_timeout=0.1)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", self.port).start()
            started.set()
            await self._stop.wait()
            await runner.cleanup()

        self._thread = threading.Thread(target=lambda: asyncio.run(main()), daemon=True)
        self._thread.start()
        if not started.wait(10):
            raise RuntimeError("the vLLM-Omni double did not start")

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
